"""Webdataset shards as an indexed sample table (no torch: cheap to import).

A webdataset shard is a tar of samples ``<key>.<ext>``; each sample here has an image member
(png/jpg/jpeg/webp) and a ``cls`` label.  :func:`scan_shards` reads the tar headers once and
returns, per sample, where its image bytes sit (url, offset, size), so any stage can rebuild any
sample's view without scanning again.  The table is columnar (:class:`Samples`): numpy and Arrow
columns, no Python object per sample, so millions of samples cost tens of bytes each and
DataLoader workers share them without copy-on-read growth.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
from braceexpand import braceexpand

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")


@dataclass
class Sample:
    key: str
    label: int
    url: str
    offset: int
    size: int


@dataclass
class Samples:
    """Samples as columns: ``urls`` once, then per sample an index into them, the key (Arrow
    strings), the label and the image member's byte offset and size in its tar."""

    urls: list[str]
    url: np.ndarray  # int32 index into urls
    key: pa.Array  # strings
    label: np.ndarray  # int64
    offset: np.ndarray  # int64
    size: np.ndarray  # int64

    @classmethod
    def of(cls, samples: list[Sample]) -> Samples:
        urls = list(dict.fromkeys(s.url for s in samples))
        where = {u: i for i, u in enumerate(urls)}
        return cls(urls, np.array([where[s.url] for s in samples], dtype=np.int32),
                   pa.array([s.key for s in samples], type=pa.string()),
                   np.array([s.label for s in samples], dtype=np.int64),
                   np.array([s.offset for s in samples], dtype=np.int64),
                   np.array([s.size for s in samples], dtype=np.int64))

    @classmethod
    def concat(cls, parts: list[Samples]) -> Samples:
        urls = list(dict.fromkeys(u for p in parts for u in p.urls))
        where = {u: i for i, u in enumerate(urls)}
        remap = [np.array([where[u] for u in p.urls], dtype=np.int32) for p in parts]
        return cls(urls, np.concatenate([r[p.url] for r, p in zip(remap, parts)] or [np.zeros(0, np.int32)]),
                   pa.concat_arrays([p.key for p in parts]) if parts else pa.array([], pa.string()),
                   *(np.concatenate([getattr(p, c) for p in parts] or [np.zeros(0, np.int64)])
                     for c in ("label", "offset", "size")))

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        return Samples(self.urls, self.url[idx], self.key.take(pa.array(idx)), self.label[idx], self.offset[idx],
                       self.size[idx])

    def sample(self, i: int) -> Sample:
        """Sample ``i`` as one object (for messages and tests, never on the hot path)."""
        return Sample(self.key[i].as_py(), int(self.label[i]), self.urls[self.url[i]], int(self.offset[i]),
                      int(self.size[i]))

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
class BadSample:
    key: str
    url: str
    error: str


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Brace patterns (``train-{000000..000009}.tar``) and lists of them to a flat url list."""
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for p in pats:
        for part in p.split("::"):
            out.extend(braceexpand(part))
    return out


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the basename."""
    d = name.rfind("/") + 1
    dot = name.find(".", d)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def scan_shard(url: str) -> tuple[list[Sample], list[BadSample]]:
    """Index one tar: image member offsets and labels.  A truncated tar yields what precedes the cut."""
    samples: dict[str, dict] = {}
    bad: list[BadSample] = []
    try:
        f = fsspec.open(url, "rb").open()
    except (OSError, ValueError) as e:
        raise PipelineError(f"{url}: cannot open shard ({e})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            return [], [BadSample("<shard>", url, f"not a tar file: {e}")]
        last_key = "<start>"
        try:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                last_key = key
                rec = samples.setdefault(key, {})
                if ext in IMAGE_EXTS:
                    rec["img"] = (m.offset_data, m.size)
                elif ext == "cls":
                    data = tf.extractfile(m).read()
                    try:
                        rec["cls"] = int(data.decode().strip())
                    except ValueError:
                        rec["err"] = f"bad cls value {data[:20]!r}"
        except (tarfile.TarError, EOFError, OSError) as e:
            bad.append(BadSample(last_key, url, f"truncated or corrupt tar after this key: {e}"))
            # the last sample may be partial: drop it unless both members were read whole
    out: list[Sample] = []
    for key, rec in samples.items():
        if "err" in rec:
            bad.append(BadSample(key, url, rec["err"]))
        elif "img" not in rec or "cls" not in rec:
            missing = "image" if "img" not in rec else "cls label"
            bad.append(BadSample(key, url, f"sample has no {missing}"))
        else:
            off, size = rec["img"]
            out.append(Sample(key, rec["cls"], url, off, size))
    if bad and bad[-1].error.startswith("truncated") and out and out[-1].key == bad[-1].key:
        out.pop()
    return out, bad


def check_labels(samples: Samples, num_classes: int) -> None:
    """Every label must index the classifier: ``data.num_classes`` is checked against the data."""
    out = np.flatnonzero((samples.label < 0) | (samples.label >= num_classes))
    if len(out):
        s = samples.sample(int(out[0]))
        raise PipelineError(f"data.num_classes: {num_classes}, but sample {s.key} in {s.url} has label {s.label} "
                            f"(labels must be 0..{num_classes - 1})")


def scan_shards(urls: list[str], progress: bool = True) -> tuple[Samples, list[BadSample]]:
    """Every sample of the shards as one columnar table (per-shard objects are dropped as it goes)."""
    from tqdm.auto import tqdm

    parts: list[Samples] = []
    bad: list[BadSample] = []
    for url in tqdm(urls, desc="scan shards", unit="shard", disable=not progress or len(urls) < 4):
        s, b = scan_shard(url)
        parts.append(Samples.of(s))
        bad.extend(b)
    return Samples.concat(parts), bad
