"""The manifest: one row per cache row, as typed Parquet columns readable without the project.

``row, split, view, key, label, url, offset, size, crc32, cls_offset, cls_size, cls_crc32, shard``
(the image member's byte range and crc32, then the label member's: -1 where not recorded, and
absent from older manifests) and one column per view
parameter (``crop_top, crop_left, crop_height, crop_width, flip, interp`` and the policy's others:
whatever :class:`cache.rows.Rows` carries; a column with a second axis is a fixed-size list, and a
column of codes names what they mean in its field metadata, ``{"codes": "name0,name1,..."}``).
Shard urls are recorded relative to the cache's folder when they lie in the workdir
(:func:`pipeline.fsutil.recorded_path`) and dictionary-encoded, like ``split``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.fsutil import recorded_path, resolve_recorded

from .rows import RECORDED_COLUMNS, Rows, Samples

# the columns that are not view parameters
ROW_COLUMNS = ("row", "split", "view", "key", "label", "url", "offset", "size", "crc32", "cls_offset", "cls_size",
               "cls_crc32", "shard")


def manifest_table(rows: Rows, blocks: list[dict], rows_per_shard: int, cache_dir: Path, workdir: Path,
                   codes: dict[str, tuple[str, ...]] | None = None) -> pa.Table:
    """The manifest: one row per cache row, as typed columns.  Shard urls are recorded relative to
    ``cache_dir`` when they lie in ``workdir`` (:func:`pipeline.fsutil.recorded_path`); ``codes``
    names what the integer codes of some view columns mean."""
    n = len(rows)
    split = np.zeros(n, dtype=np.int32)
    view = np.zeros(n, dtype=np.int32)
    for b in blocks:
        split[b["start"] : b["stop"]] = 0 if b["split"] == "train" else 1
        view[b["start"] : b["stop"]] = b["view"]
    s = rows.samples
    recorded = pa.array([recorded_path(u, cache_dir, workdir) for u in s.urls], pa.string())
    cols = {
        "row": np.arange(n, dtype=np.int64),
        "split": pa.DictionaryArray.from_arrays(split, ["train", "val"]),
        "view": view,
        "key": s.key.take(pa.array(rows.sample)),
        "label": s.label[rows.sample],
        "url": pa.DictionaryArray.from_arrays(s.url[rows.sample], recorded),
        "offset": s.offset[rows.sample],
        "size": s.size[rows.sample],
        **{c: getattr(s, c)[rows.sample] for c in RECORDED_COLUMNS},
        **{f: _column(c) for f, c in rows.params.items()},
        "shard": (np.arange(n) // rows_per_shard).astype(np.int32),
    }
    table = pa.table(cols)
    for name, names in (codes or {}).items():
        if name in table.column_names:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.field(i).with_metadata({"codes": ",".join(names)}), table.column(i))
    return table


def _column(c: np.ndarray):
    """A view column as Arrow: 2-D numpy as a fixed-size list per row."""
    if c.ndim == 1:
        return c
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(c).reshape(-1)), c.shape[1])


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A view column as numpy: a fixed-size list column as (n, k)."""
    if pa.types.is_fixed_size_list(column.type):
        flat = column.combine_chunks()
        return flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), column.type.list_size)
    return column.to_numpy()


def rows_of_manifest(m: pa.Table, base: Path) -> Rows:
    """The rows of a manifest, columnar: recorded urls resolved against ``base`` (the cache's
    folder), each sample stored once however many views it has."""
    url = m.column("url").combine_chunks()
    if not isinstance(url, pa.DictionaryArray):
        url = url.dictionary_encode()
    urls = [resolve_recorded(u, base) for u in url.dictionary.to_pylist()]
    url_idx = url.indices.to_numpy(zero_copy_only=False).astype(np.int64)

    def col(name: str) -> np.ndarray:
        return _numpy(m.column(name))

    offset = col("offset").astype(np.int64)
    _, first, sample = np.unique((url_idx << 40) | offset, return_index=True, return_inverse=True)
    recorded = {c: col(c)[first].astype(np.int64) for c in RECORDED_COLUMNS if c in m.column_names}  # older: fewer
    samples = Samples(urls, url_idx[first].astype(np.int32), m.column("key").combine_chunks().take(pa.array(first)),
                      col("label")[first].astype(np.int64), offset[first], col("size")[first].astype(np.int64),
                      **recorded)
    params = [c for c in m.column_names if c not in ROW_COLUMNS]
    return Rows(samples, sample.reshape(-1), {f: col(f) for f in params}, extracted=True)
