"""analyze's feature store: the val-split features of every model, one Zarr array per (model, layer).

``features.zarr/<model>/<layer>`` (rows, C, H, W) float16, sharded by the cache's rows per shard,
inner chunks near 1 MiB, zstd 1 + crc32c: written one shard of rows at a time, read by Dask with
one task per shard (``dask.array.from_zarr(arr, chunks=arr.shards)``: its default, the inner
chunks, makes tiny tasks).
"""

from __future__ import annotations

from pathlib import Path

import zarr

from .layout import chunk_rows


class FeatureStore:
    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode=mode)

    @classmethod
    def create(cls, path: str | Path) -> FeatureStore:
        """An empty store at ``path`` (what was there is replaced)."""
        return cls(path, mode="w")

    def new_array(self, model: str, layer: str, rows: int, shape: tuple[int, int, int], rows_per_shard: int):
        """A zarr array for ``rows`` rows of one layer's features (C, H, W)."""
        from zarr.codecs import Crc32cCodec, ZstdCodec

        c, h, w = shape
        n = chunk_rows(rows_per_shard, c * h * w * 2, 1 << 20)
        return self.group.create_array(
            f"{model}/{layer}", shape=(rows, c, h, w), dtype="float16", chunks=(n, c, h, w),
            shards=(rows_per_shard, c, h, w), compressors=[ZstdCodec(level=1), Crc32cCodec()], fill_value=0,
            overwrite=True,
        )

    def dask_array(self, model: str, layer: str):
        """One layer's features as a Dask array with one chunk per shard."""
        import dask.array as da

        z = self.group[f"{model}/{layer}"]
        return da.from_zarr(z, chunks=z.shards)
