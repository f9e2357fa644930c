"""Webdataset shards as an indexed sample table (no torch: cheap to import).

A webdataset shard is a tar of samples ``<key>.<ext>``; each sample here has an image member
(png/jpg/jpeg/webp) and a ``cls`` label.  :func:`scan_shards` reads each tar once (prepare does,
into ``index.parquet``) and returns, per sample, where its image bytes sit (url, offset, size) and
their crc32, so any stage can rebuild any sample's view, checked, without scanning again.  The
table is columnar (:class:`cache.rows.Samples`): numpy and Arrow columns, no Python object per
sample, so millions of samples cost tens of bytes each and DataLoader workers share them without
copy-on-read growth.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from braceexpand import braceexpand

from cache.rows import Sample, Samples, string_hashes  # noqa: F401  (the sample table)
from pipeline.errors import PipelineError
from pipeline.fingerprint import file_digest
from pipeline.fsutil import read_json, resolve_recorded

log = logging.getLogger("pipeline")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")


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
    """Index one tar: image member offsets, sizes and crc32s, and labels.  A truncated tar yields what
    precedes the cut."""
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
                if ext in IMAGE_EXTS:  # the bytes are read once, for the crc32 every later read checks
                    rec["img"] = (m.offset_data, m.size, zlib.crc32(tf.extractfile(m).read()))
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
            off, size, crc = rec["img"]
            out.append(Sample(key, rec["cls"], url, off, size, crc))
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


# ----------------------------------------------------------------------------- the index prepare writes

INDEX = "index.parquet"


def load_index(record) -> tuple[Samples, Samples, list[dict]]:
    """The train and val samples and the skipped samples a prepare record indexed, after checking
    the index and the shard list against the digests prepare recorded."""
    path = Path(record.path)
    data = (path / INDEX).read_bytes() if (path / INDEX).exists() else b""
    if hashlib.sha256(data).hexdigest() != record.summary.get("index_sha256"):
        raise PipelineError(f"{path / INDEX}: the sample index is missing or not the one prepare wrote "
                            f"(sha256 mismatch); rerun prepare with --force")
    shard_lists(record)  # checks shards.json
    skipped = [{**b, "url": resolve_recorded(b["url"], path)} for b in read_json(path / "shards.json")["skipped"]]
    table = pq.read_table(pa.BufferReader(data), read_dictionary=["split", "url"])
    out = []
    for split in ("train", "val"):
        t = table.filter(pc.equal(table.column("split").cast(pa.string()), split)).combine_chunks()
        url = t.column("url").chunk(0) if t.num_rows else pa.DictionaryArray.from_arrays(
            pa.array([], pa.int32()), pa.array([], pa.string()))
        urls = [resolve_recorded(u, path) for u in url.dictionary.to_pylist()]
        key = t.column("key").chunk(0) if t.num_rows else pa.array([], pa.string())
        crc = t.column("crc32").to_numpy() if "crc32" in t.column_names else None  # older indexes have none
        out.append(Samples(urls, url.indices.to_numpy(zero_copy_only=False).astype(np.int32), key,
                           *(t.column(c).to_numpy() for c in ("label", "offset", "size")), crc))
    return out[0], out[1], skipped


def shard_lists(record) -> tuple[list[str], list[str]]:
    """The train and val shard urls a prepare record points at (its recorded relative paths resolved),
    after checking the shard list against the digest prepare recorded."""
    f = Path(record.path) / "shards.json"
    if file_digest(f) != record.summary.get("shards_json_sha256"):
        raise PipelineError(f"{f}: the shard list is not the one prepare wrote (sha256 mismatch); "
                            f"rerun prepare with --force")
    m = read_json(f)
    return ([resolve_recorded(u, record.path) for u in m["train"]],
            [resolve_recorded(u, record.path) for u in m["val"]])
