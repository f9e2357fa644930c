"""analyze's feature store: the val-split features of every model, one Zarr array per (model, layer).

``features.zarr/<model>/<layer>`` (rows, C, H, W) float16, sharded by the cache's rows per shard,
inner chunks near 1 MiB, zstd 1 + crc32c: written one whole shard of rows at a time, each shard file
in one atomic write (:class:`cache.shardfile.ShardEncoder`; a failed write names the file and the
cause), read by Dask with one task per shard (``dask.array.from_zarr(arr, chunks=arr.shards)``: its
default, the inner chunks, makes tiny tasks).

What analyze records of the store (:func:`store_digests`) is, per group and array, the sha256 of its
``zarr.json`` and of its shard files' names and sizes: no chunk is read, so a status check costs one
``stat`` per shard file, yet a deleted, added or resized shard file and an edited ``zarr.json`` (a
codec, the crc32c that checks every chunk) are found.  A changed byte inside a chunk is found by
that chunk's crc32c, which zarr checks on every read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import PipelineError
from pipeline.fsutil import WriteError

from .layout import chunk_rows
from .shardfile import ShardEncoder

META = "zarr.json"


class FeatureStore:
    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode=mode)
        except OSError as e:
            if mode == "r":
                raise PipelineError(f"{self.path}: cannot open the feature store ({e.strerror or e})") from None
            raise WriteError(self.path / META, e) from None
        self._encoders: dict[str, ShardEncoder] = {}

    @classmethod
    def create(cls, path: str | Path) -> FeatureStore:
        """An empty store at ``path`` (what was there is replaced)."""
        return cls(path, mode="w")

    def new_array(self, model: str, layer: str, rows: int, shape: tuple[int, int, int], rows_per_shard: int):
        """A zarr array for ``rows`` rows of one layer's features (C, H, W)."""
        from zarr.codecs import Crc32cCodec, ZstdCodec

        c, h, w = shape
        n = chunk_rows(rows_per_shard, c * h * w * 2, 1 << 20)
        try:
            return self.group.create_array(
                f"{model}/{layer}", shape=(rows, c, h, w), dtype="float16", chunks=(n, c, h, w),
                shards=(rows_per_shard, c, h, w), compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0,
                overwrite=True,
            )
        except OSError as e:
            raise WriteError(self.path / model / layer / META, e) from None

    def write_shard(self, arr, s: int, block: np.ndarray) -> None:
        """Shard ``s`` of array ``arr`` (of :meth:`new_array`), ``block`` holding exactly its rows,
        written in one atomic write; a failed write raises :class:`pipeline.fsutil.WriteError`."""
        name = arr.path
        if name not in self._encoders:
            enc = ShardEncoder.for_array(arr, self.path / name)
            if enc is None:
                raise PipelineError(f"{self.path / name / META}: not a row-sharded layout this store writes")
            self._encoders[name] = enc
        self._encoders[name].write(s, block.astype(np.float16, copy=False))

    def dask_array(self, model: str, layer: str):
        """One layer's features as a Dask array with one chunk per shard."""
        import dask.array as da

        z = self.group[f"{model}/{layer}"]
        return da.from_zarr(z, chunks=z.shards)


def store_digests(path: str | Path) -> dict[str, str]:
    """Node of the store at ``path`` (each group's and array's folder relative to it, '.' for the
    root) -> sha256 of its ``zarr.json`` bytes and of the relative name and size of each of its shard
    files (temporary files, named with a leading dot, left out)."""
    path = Path(path)
    out = {}
    for meta in sorted(path.rglob(META)):
        node = meta.parent
        h = hashlib.sha256(meta.read_bytes())
        chunks = node / "c"
        for f in sorted(chunks.rglob("*")) if chunks.is_dir() else []:
            if f.is_file() and not f.name.startswith("."):
                h.update(f"\n{f.relative_to(node).as_posix()} {f.stat().st_size}".encode())
        out[node.relative_to(path).as_posix()] = h.hexdigest()
    return out


def store_problems(path: str | Path, recorded: dict[str, str]) -> list[str]:
    """One line per node of ``recorded`` (:func:`store_digests` when the store was written) that the
    store at ``path`` no longer has, or has with another ``zarr.json`` or other shard files."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is missing"]
    now = store_digests(path)
    problems = []
    for node, want in sorted(recorded.items()):
        got = now.get(node)
        if got is None:
            problems.append(f"{path / node / META} is missing")
        elif got != want:
            problems.append(f"{path / node}: its {META} or shard files changed since analyze wrote them "
                            f"(sha256 mismatch)")
    return problems
