"""Writing the cache: whole shards, durably, each recorded complete only once it is on disk.

zarr-python loses data when two writers touch one shard (zarr-python #3682, #3514), so a writer
is given whole shards and writes each shard file in one pass (:mod:`cache.shardfile`).  After the
shard files are fsynced, a marker ``_complete/<s>.json`` (with each file's size) is written
atomically; a shard without its marker, or whose files are no longer the sizes it records, is
rewritten on resume, a shard with a sound one is never touched again.  :meth:`CacheWriter.finalize` checks every marked file against its recorded size, writes the
shard index and records the digests readers check (:mod:`cache.reader`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.errors import PipelineError
from pipeline.fsutil import WriteError, atomic_write_bytes, atomic_write_json, describe_os_error, fsync_dir, read_json

from .layout import (COMPLETE_DIR, FORMAT_VERSION, MANIFEST, SHARD_INDEX, CacheSpec, marker_name, meaning_digest,
                     shard_key, spec_to_attrs)
from .shardfile import ShardEncoder


def _disk_error(path: Path, e: OSError, what: str) -> PipelineError:
    where = e.filename if isinstance(e, WriteError) else path  # the file itself, when known
    return PipelineError(f"{where}: cannot write {what} ({describe_os_error(e)}); "
                         f"completed shards are kept, rerun to resume")


class CacheWriter:
    def __init__(self, path: str | Path, spec: CacheSpec):
        self.path = Path(path)
        self.spec = spec
        self.group = None
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads the array's metadata
        self._encoders: dict[str, ShardEncoder | None] = {}

    # ---------------------------------------------------------------- create / resume
    def create_or_resume(self, attrs: dict, manifest: pa.Table, fresh: bool = False) -> bool:
        """Create the group and arrays, or reopen one with the same fingerprint.  True if resumed.

        ``fresh`` starts over even when a cache with the same fingerprint is there (--force).
        """
        zj = self.path / "zarr.json"
        try:
            if zj.exists() and not fresh:
                g = zarr.open_group(str(self.path), mode="r+")
                if g.attrs.get("fingerprint") == attrs["fingerprint"]:
                    self.group = g
                    for tmp in self.path.rglob(".*.tmp"):  # a shard write cut short by a crash
                        tmp.unlink(missing_ok=True)
                    return True
                # another fingerprint in this folder: never mix, start over
            if (self.path / COMPLETE_DIR).exists():  # markers of another cache's shards
                shutil.rmtree(self.path / COMPLETE_DIR)
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / SHARD_INDEX).unlink(missing_ok=True)
            g = zarr.open_group(str(self.path), mode="w")
            manifest_bytes = _parquet_bytes(manifest)
            full = {
                **attrs,
                "format_version": FORMAT_VERSION,
                "spec": spec_to_attrs(self.spec),
                "num_shards": self.spec.num_shards,
                "complete": False,
                "created": _dt.datetime.now().isoformat(timespec="seconds"),
            }
            full["integrity"] = {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                                 "meaning_sha256": meaning_digest(full)}
            g.attrs.update(full)
            for name in self.spec.arrays():
                g.create_array(name, **self.spec.array_args(name))  # the reader checks the same arguments
            atomic_write_bytes(self.path / MANIFEST, [manifest_bytes])
            (self.path / COMPLETE_DIR).mkdir(exist_ok=True)
            self.group = g
            return False
        except OSError as e:
            raise _disk_error(self.path, e, "the cache") from None

    def completed(self) -> set[int]:
        d = self.path / COMPLETE_DIR
        if not d.exists():
            return set()
        return {int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()}

    def unmark_damaged(self) -> list[int]:
        """Unmark each complete shard whose marker cannot be read or one of whose files is not the
        size the marker records (deleted, emptied or truncated since): a resuming run writes it
        again instead of failing at :meth:`finalize`.  Returns those shards."""
        damaged = []
        for s in sorted(self.completed()):
            try:
                files = read_json(self.path / marker_name(s)).get("files", {})
            except (OSError, ValueError):
                files = {}
            if any(self._size(name, s) != files.get(name) for name in self.spec.arrays()):
                (self.path / marker_name(s)).unlink(missing_ok=True)
                damaged.append(s)
        return damaged

    def _size(self, name: str, s: int) -> int | None:
        f = self._shard_file(name, s)
        return f.stat().st_size if f.exists() else None

    # ---------------------------------------------------------------- shards
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _shard_file(self, name: str, s: int) -> Path:
        return self.path / name / shard_key(self._array(name), s)

    def _encoder(self, name: str) -> ShardEncoder | None:
        if name not in self._encoders:
            self._encoders[name] = ShardEncoder.for_array(self._array(name), self.path / name)
        return self._encoders[name]

    def write_shard(self, s: int, data: dict[str, np.ndarray], bad: list[dict]) -> None:
        """Write shard ``s`` of every array (data[name] holds exactly the shard's rows), then mark it.

        Each array's shard file is encoded in one pass and renamed into place after an fsync
        (:mod:`cache.shardfile`); an array whose codecs that path does not know goes through
        zarr's own assignment and is fsynced afterwards.
        """
        a, b = self.spec.shard_rows(s)
        try:
            dirs = set()
            sizes = {}
            for name in self.spec.arrays():
                block = data[name]
                if block.shape[0] != b - a:
                    raise ValueError(f"shard {s}: {name} has {block.shape[0]} rows, expected {b - a}")
                enc = self._encoder(name)
                if enc is not None:
                    f = enc.write(s, block)
                else:
                    self._array(name)[a:b] = block
                    f = self._shard_file(name, s)
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                sizes[name] = f.stat().st_size
                dirs.add(f.parent)
            for d in dirs:
                fsync_dir(d)
            atomic_write_json(self.path / marker_name(s), {"shard": s, "rows": [a, b], "bad": bad, "files": sizes})
        except OSError as e:
            raise _disk_error(self.path, e, f"shard {s}") from None

    def finalize(self, extra: dict) -> dict:
        """Mark the cache complete once every shard is and every shard file has the size its marker
        records; write the shard index.  Returns the collected bad rows."""
        done = self.completed()
        missing = sorted(set(range(self.spec.num_shards)) - done)
        if missing:
            raise PipelineError(f"{self.path}: shards {missing[:10]} are not complete; rerun extract")
        bad, names, shards, sizes = [], [], [], []
        for s in sorted(done):
            marker = read_json(self.path / marker_name(s))
            bad.extend(marker.get("bad", []))
            for name in self.spec.arrays():
                want = marker.get("files", {}).get(name)
                f = self._shard_file(name, s)
                got = self._size(name, s)
                if want is None or got != want:
                    (self.path / marker_name(s)).unlink(missing_ok=True)  # rewritten by the next run
                    raise PipelineError(f"{f}: shard {s} file is {'missing' if got is None else f'{got} bytes'}, "
                                        f"extract wrote {want} bytes; rerun extract to rewrite it")
                names.append(name)
                shards.append(s)
                sizes.append(want)
        index = pa.table({"array": names, "shard": np.array(shards, dtype=np.int64),
                          "nbytes": np.array(sizes, dtype=np.int64)})
        index_bytes = _parquet_bytes(index)
        try:
            atomic_write_bytes(self.path / SHARD_INDEX, [index_bytes])
            integrity = {**self.group.attrs.get("integrity", {}),
                         "shard_index_sha256": hashlib.sha256(index_bytes).hexdigest()}
            self.group.attrs.update({**extra, "complete": True, "bad_rows": bad, "integrity": integrity})
        except OSError as e:
            raise _disk_error(self.path, e, "the cache attributes") from None
        return {"bad_rows": bad}


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
