"""Webdataset shards as an indexed sample table (no torch: cheap to import).

A webdataset shard is a tar of samples ``<key>.<ext>``; each sample here has an image member
(png/jpg/jpeg/webp) and a ``cls`` label.  :func:`scan_shards` reads the tar headers once and
returns, per sample, where its image bytes sit (url, offset, size), so any stage can rebuild any
sample's view without scanning again.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass

import fsspec
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


def check_labels(samples: list[Sample], num_classes: int) -> None:
    """Every label must index the classifier: ``data.num_classes`` is checked against the data."""
    for s in samples:
        if not 0 <= s.label < num_classes:
            raise PipelineError(f"data.num_classes: {num_classes}, but sample {s.key} in {s.url} has label {s.label} "
                                f"(labels must be 0..{num_classes - 1})")


def scan_shards(urls: list[str], progress: bool = True) -> tuple[list[Sample], list[BadSample]]:
    from tqdm.auto import tqdm

    samples: list[Sample] = []
    bad: list[BadSample] = []
    for url in tqdm(urls, desc="scan shards", unit="shard", disable=not progress or len(urls) < 4):
        s, b = scan_shard(url)
        samples.extend(s)
        bad.extend(b)
    return samples, bad
