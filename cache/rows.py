"""Samples and rows as columns: the data model of the cache's manifest and of every loader.

A :class:`Samples` table holds the shard urls once and, per sample, an index into them, the key
(Arrow strings), the label, and the byte range and crc32 of its image and label members;
:class:`Rows` adds, per row, the index of its sample and one numpy column per view parameter.  No
Python object per sample or row: millions of rows cost tens of bytes each, and processes forked
from the one that holds them (data loader workers) share them without copy-on-read growth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Sample:
    key: str
    label: int
    url: str
    offset: int
    size: int
    crc32: int = -1  # of the image bytes as indexed; -1: not recorded
    cls_offset: int = -1  # the label member's byte range and crc32 as indexed; -1: not recorded
    cls_size: int = -1
    cls_crc32: int = -1


# the per-sample integer columns of a Samples table after the url index and the key, in order
SAMPLE_COLUMNS = ("label", "offset", "size", "crc32", "cls_offset", "cls_size", "cls_crc32")
# the columns that are -1 when not recorded (an older index or manifest): readers then skip the check
RECORDED_COLUMNS = ("crc32", "cls_offset", "cls_size", "cls_crc32")


@dataclass
class Samples:
    """Samples as columns: ``urls`` once, then per sample an index into them, the key (Arrow
    strings), the label, the image member's byte offset and size in its tar and the crc32 of its
    bytes when it was indexed, and the same three of its label (``cls``) member: readers check both
    (-1: not recorded, not checked)."""

    urls: list[str]
    url: np.ndarray  # int32 index into urls
    key: pa.Array  # strings
    label: np.ndarray  # int64
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    crc32: np.ndarray | None = None  # int64; None: not recorded for any sample
    cls_offset: np.ndarray | None = None  # int64, the label member's; None: not recorded for any sample
    cls_size: np.ndarray | None = None
    cls_crc32: np.ndarray | None = None

    def __post_init__(self) -> None:
        for c in RECORDED_COLUMNS:
            if getattr(self, c) is None:
                setattr(self, c, np.full(len(self.label), -1, dtype=np.int64))

    @classmethod
    def of(cls, samples: list[Sample]) -> Samples:
        urls = list(dict.fromkeys(s.url for s in samples))
        where = {u: i for i, u in enumerate(urls)}
        return cls(urls, np.array([where[s.url] for s in samples], dtype=np.int32),
                   pa.array([s.key for s in samples], type=pa.string()),
                   *(np.array([getattr(s, c) for s in samples], dtype=np.int64) for c in SAMPLE_COLUMNS))

    @classmethod
    def concat(cls, parts: list[Samples]) -> Samples:
        urls = list(dict.fromkeys(u for p in parts for u in p.urls))
        where = {u: i for i, u in enumerate(urls)}
        remap = [np.array([where[u] for u in p.urls], dtype=np.int32) for p in parts]
        return cls(urls, np.concatenate([r[p.url] for r, p in zip(remap, parts)] or [np.zeros(0, np.int32)]),
                   pa.concat_arrays([p.key for p in parts]) if parts else pa.array([], pa.string()),
                   *(np.concatenate([getattr(p, c) for p in parts] or [np.zeros(0, np.int64)])
                     for c in SAMPLE_COLUMNS))

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        return Samples(self.urls, self.url[idx], self.key.take(pa.array(idx)),
                       *(getattr(self, c)[idx] for c in SAMPLE_COLUMNS))

    def sample(self, i: int) -> Sample:
        """Sample ``i`` as one object (for messages and tests, never on the hot path)."""
        return Sample(self.key[i].as_py(), int(self.label[i]), self.urls[self.url[i]],
                      *(int(getattr(self, c)[i]) for c in SAMPLE_COLUMNS[1:]))

    def key_hashes(self) -> np.ndarray:
        """A 64-bit FNV-1a hash of each key's UTF-8 bytes (vectorized over the Arrow buffers): what
        seeds a sample's views and its place in the row layout, whatever order the shards list it in."""
        return string_hashes(self.key)


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def string_hashes(strings: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each string of an Arrow string array, one numpy pass per byte position."""
    arr = pa.concat_arrays([strings.cast(pa.string())]) if len(strings) else pa.array([], pa.string())
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    start, length = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    with np.errstate(over="ignore"):
        for j in range(int(length.max(initial=0))):
            live = length > j
            b = data[np.minimum(start + j, len(data) - 1)].astype(np.uint64)
            h = np.where(live, (h ^ b) * _FNV_PRIME, h)
    return h



@dataclass
class Rows:
    """Rows as columns: row ``i`` is view ``params[*][i]`` of sample ``sample[i]`` of ``samples``.

    No Python object per row: a row costs its sample index and its view parameters.  ``extracted``:
    the rows of a cache's manifest, whose images extract read (what a changed image is reported as).
    """

    samples: Samples
    sample: np.ndarray  # int64 index into samples, per row
    params: dict[str, np.ndarray]  # one column per view parameter (stages.views.ViewPolicy.fields); (n, k) for lists
    extracted: bool = False

    def __len__(self) -> int:
        return len(self.sample)

    def view_params(self, i: int) -> dict:
        """Row ``i``'s view parameters: booleans and floats, numpy arrays for list columns."""
        return {f: (c[i] if c.ndim > 1 else bool(c[i]) if c.dtype == bool else float(c[i]))
                for f, c in self.params.items()}

    def source(self, i: int) -> Sample:
        return self.samples.sample(int(self.sample[i]))

    def labels(self, idx) -> np.ndarray:
        return self.samples.label[self.sample[np.asarray(idx, dtype=np.int64)]]

    def with_views(self, start: int, params: dict[str, np.ndarray]) -> Rows:
        """These rows with rows ``start .. start + n`` given the view parameters ``params`` (n per
        column), the same samples: a student's fresh views of one block."""
        cols = {}
        for f, c in self.params.items():
            c = c.copy()
            c[start : start + len(params[f])] = params[f]
            cols[f] = c
        return Rows(self.samples, self.sample, cols, self.extracted)

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        """Rows of several tables over one :class:`Samples` (``parts`` share ``samples`` and fields)."""
        samples = parts[0].samples
        assert all(p.samples is samples for p in parts)
        return cls(samples, np.concatenate([p.sample for p in parts]),
                   {f: np.concatenate([p.params[f] for p in parts]) for f in parts[0].params}, parts[0].extracted)
