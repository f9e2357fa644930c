"""Webdataset shards as an indexed sample table (no torch: cheap to import).

A webdataset shard is a tar of samples ``<key>.<ext>``; each sample here has an image member
(png/jpg/jpeg/webp) and a ``cls`` label.  :func:`scan_shards` reads each tar once (prepare does,
into ``index.parquet``) and returns, per sample, where its image and label bytes sit (url, offset,
size) and their crc32s, so any stage can rebuild any sample's view, checked, without scanning
again.  Shards may be local files or objects on a store (``s3://bucket/train-{000000..000099}.tar``,
read with ``data.storage_options``: :mod:`pipeline.storage`).  Input rules: local shards are
regular files (:func:`require_regular_file`), a key names one sample in all the shards
(:func:`check_unique_keys`), and member names are UTF-8.  The
table is columnar (:class:`cache.rows.Samples`): numpy and Arrow columns, no Python object per
sample, so millions of samples cost tens of bytes each and DataLoader workers share them without
copy-on-read growth.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
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

from cache.rows import RECORDED_COLUMNS, SAMPLE_COLUMNS, Sample, Samples, string_hashes  # noqa: F401  (the sample table)
from pipeline import storage
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


def require_regular_file(url: str, field: str | None = None) -> None:
    """Refuse a local shard path that is missing or not a regular file (a FIFO would block its
    reader forever, a directory or device is no tar), before anything opens it.  ``field``: the
    config field that lists it, for the message.  Other filesystems' urls are left to their reads."""
    from fsspec.implementations.local import LocalFileSystem

    if storage.is_url(url):
        return
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return
    where = f"{field}: {url}" if field else url
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PipelineError(f"{where} does not exist") from None
    except OSError as e:
        raise PipelineError(f"{where} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise PipelineError(f"{where} is {_file_kind(mode)}, not a regular file; list only tar files")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a file")


def readable_name(name: str) -> str:
    """A tar member name as printable text: bytes that are not UTF-8 (kept by tarfile as surrogates)
    shown as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record_member(rec: dict, role: str, m: tarfile.TarInfo, value, key: str, url: str) -> None:
    """``rec[role] = value`` for member ``m`` of sample ``key``; a second member in the same role
    (the key repeated in the tar) is refused, naming both."""
    if role in rec:
        name, offset = rec[role + "_member"]
        what = "image" if role == "img" else "label"
        raise PipelineError(f"{url}: sample key {key!r} is repeated: {what} members {name} (byte {offset}) and "
                            f"{m.name} (byte {m.offset}); one would replace the other, remove or rename one")
    rec[role], rec[role + "_member"] = value, (m.name, m.offset)


def scan_shard(url: str) -> tuple[list[Sample], list[BadSample]]:
    """Index one tar: image and label member offsets, sizes and crc32s, and labels.  A truncated
    tar yields what precedes the cut; a sample whose member name is not UTF-8 is a bad sample; a key
    with two image or two label members is an error naming both."""
    require_regular_file(url)
    samples: dict[str, dict] = {}
    bad: list[BadSample] = []
    not_utf8: dict[str, str] = {}  # readable key -> the first such member's readable name
    cut: BadSample | None = None
    try:
        f = storage.open_file(url)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{url}: cannot open shard ({e})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="surrogateescape")
        except tarfile.TarError as e:
            return [], [BadSample("<shard>", url, f"not a tar file: {e}")]
        last_key = "<start>"
        try:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                if not _is_utf8(m.name):
                    last_key = readable_name(key)
                    not_utf8.setdefault(last_key, readable_name(m.name))
                    continue
                last_key = key
                rec = samples.setdefault(key, {})
                if ext in IMAGE_EXTS:  # the bytes are read once, for the crc32 every later read checks
                    _record_member(rec, "img", m, (m.offset_data, m.size, zlib.crc32(tf.extractfile(m).read())),
                                   key, url)
                elif ext == "cls":
                    data = tf.extractfile(m).read()
                    _record_member(rec, "cls", m, (m.offset_data, m.size, zlib.crc32(data)), key, url)
                    try:
                        rec["label"] = int(data.decode().strip())
                    except ValueError:
                        rec["err"] = f"bad cls value {data[:20]!r}"
        except (tarfile.TarError, EOFError, OSError) as e:
            cut = BadSample(last_key, url, f"truncated or corrupt tar after this key: {e}")
            bad.append(cut)
            # the last sample may be partial: it is dropped below
    out: list[Sample] = []
    for key, rec in samples.items():
        if key in not_utf8:
            continue
        if "err" in rec:
            bad.append(BadSample(key, url, rec["err"]))
        elif "img" not in rec or "cls" not in rec:
            missing = "image" if "img" not in rec else "cls label"
            bad.append(BadSample(key, url, f"sample has no {missing}"))
        else:
            out.append(Sample(key, rec["label"], url, *rec["img"], *rec["cls"]))
    bad += [BadSample(key, url, f"member name {name} is not UTF-8; rename it") for key, name in not_utf8.items()]
    if cut is not None and out and out[-1].key == cut.key:
        out.pop()
    return out, bad


def check_unique_keys(samples: Samples) -> None:
    """Refuse a sample key held by two samples of the shards (two tars, or train and val), naming
    both tars and members: views and row layouts are keyed by it, and one sample would shadow the other."""
    if len(samples) < 2:
        return
    t = pa.table({"key": samples.key, "i": np.arange(len(samples))})
    g = t.group_by("key").aggregate([("i", "min"), ("i", "max")])
    dup = g.filter(pc.not_equal(g["i_min"], g["i_max"]))
    if dup.num_rows:
        a, b = (samples.sample(int(dup[c][0].as_py())) for c in ("i_min", "i_max"))
        raise PipelineError(f"sample key {a.key!r} is in {a.url} ({_members(a.url, a.key)}) and in {b.url} "
                            f"({_members(b.url, b.key)}); keys must be unique across data.train_shards and "
                            f"data.val_shards: remove or rename one")


def _members(url: str, key: str) -> str:
    """The names of the members of sample ``key`` in tar ``url`` (for messages: one more header scan)."""
    with storage.open_file(url) as f, tarfile.open(fileobj=f, mode="r:", encoding="utf-8",
                                                    errors="surrogateescape") as tf:
        names = [m.name for m in tf if m.isfile() and _split_name(m.name)[0] == key]
    return "members " + ", ".join(names)


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
        recorded = {c: t.column(c).to_numpy() for c in RECORDED_COLUMNS if c in t.column_names}  # older: fewer
        out.append(Samples(urls, url.indices.to_numpy(zero_copy_only=False).astype(np.int32), key,
                           *(t.column(c).to_numpy() for c in ("label", "offset", "size")), **recorded))
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
