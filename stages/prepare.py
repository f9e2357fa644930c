"""prepare: turn a source into train and val webdataset shards, and index their samples once.

Sources: ``digits`` (scikit-learn's bundled 1797 8x8 digit images, upscaled, RGB, stratified
split), ``imagefolder`` (``root/<class>/<image>``), or ``shards`` (existing webdataset shards named
by ``data.train_shards`` / ``data.val_shards``: no tar is written).  Tars are byte-reproducible:
fixed mtime, owner and order.

Outputs: ``shards.json`` (the shard lists, the sizes of the shards prepare wrote, the samples that
could not be indexed) and ``index.parquet`` (split, key, url, label, and the offset, size and crc32
of the image and the label member of every sample: the scan every later stage reads instead of
scanning again).  Both are covered by digests in the stage's record, checked by
:func:`stages.shards.load_index` and by ``status``.  Refused: a shard list entry that is not a
regular file, a sample key held twice, and a split with no samples.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.fingerprint import file_digest
from pipeline.fsutil import (atomic_write, atomic_write_bytes, atomic_write_json, read_json, recorded_path,
                            resolve_recorded)

from .shards import (IMAGE_EXTS, INDEX, RECORDED_COLUMNS, BadSample, Samples, check_unique_keys, expand_urls,
                     require_regular_file, scan_shards)

log = logging.getLogger("pipeline")

MTIME = 0.0  # fixed tar member time: shards depend on content only


def source_identity(cfg: PipelineConfig) -> dict:
    """What, beyond config values, decides prepare's output: the input files' names and sizes, and
    for objects on a store their ETag too (a rewritten object of the same size is another input),
    from one listing per folder."""
    d = cfg.data
    if d.source == "shards":
        out = {}
        for split, pat in (("train", d.train_shards), ("val", d.val_shards)):
            urls = expand_urls(pat)
            remote = [u for u in urls if storage.is_url(u)]
            try:
                objects = storage.object_identities(remote)
            except FileNotFoundError as e:
                raise PipelineError(f"data.{split}_shards: {e} does not exist") from None
            except OSError as e:
                raise PipelineError(f"data.{split}_shards: cannot list {remote[0]} ({e})") from None
            entries = []
            for url in urls:
                if url in objects:
                    entries.append(objects[url])
                    continue
                require_regular_file(url, f"data.{split}_shards")
                fs, path = fsspec.core.url_to_fs(url)
                try:
                    entries.append([url, fs.size(path)])
                except (OSError, FileNotFoundError):
                    raise PipelineError(f"data.{split}_shards: {url} does not exist") from None
            out[split] = entries
        return {"shards": out}
    if d.source == "imagefolder":
        root = Path(d.root)
        if not root.is_dir():
            raise PipelineError(f"data.root: {d.root!r} is not a folder")
        h = hashlib.sha256()
        n = 0
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(root)}\0{p.stat().st_size}\n".encode())
                n += 1
        return {"imagefolder": {"files": n, "listing_sha256": h.hexdigest()}}
    return {}


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: indices (sorted) of train and val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.array(sorted(train)), np.array(sorted(val))


def write_shards(out: Path, prefix: str, items: list[tuple[str, bytes, str, int]], per_shard: int) -> list[str]:
    """items: (key, image bytes, image ext, label) -> prefix-000000.tar, ...; returns the paths."""
    import webdataset as wds

    paths = []
    for s in range(0, max(1, (len(items) + per_shard - 1) // per_shard)):
        chunk = items[s * per_shard : (s + 1) * per_shard]
        path = out / f"{prefix}-{s:06d}.tar"

        def write(f, chunk=chunk):
            with wds.TarWriter(f, mtime=MTIME, user="", group="", encoder=False) as w:
                for key, data, ext, label in chunk:
                    w.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})

        atomic_write(path, write)
        paths.append(str(path))
    return paths


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digits_items(size: int) -> tuple[list[tuple[str, bytes, str, int]], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    items = []
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        a = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
        items.append((f"digits_{i:05d}", _png(np.asarray(im)), "png", int(y)))
    return items, d.target.astype(np.int64)


def imagefolder_items(root: Path) -> tuple[list[tuple[str, bytes, str, int]], np.ndarray, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise PipelineError(f"data.root: {root} has no class folders")
    if len(classes) == 1:
        log.warning(f"prepare: {root} has one class folder ({classes[0]}): every label is 0")
    items, labels, source = [], [], {}
    for ci, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            ext = p.suffix.lower().lstrip(".")
            if not p.is_file() or ext not in IMAGE_EXTS:
                continue
            key = f"{c}_{p.stem}".replace(".", "_")
            if key in source:  # webdataset groups members by key: one of the two would be lost
                raise PipelineError(f"data.root: {source[key]} and {p} both become sample key {key!r}; "
                                    f"rename one of them")
            source[key] = p
            items.append((key, p.read_bytes(), ext, ci))
            labels.append(ci)
    return items, np.array(labels), classes


def run(ctx) -> dict:
    cfg = ctx.cfg
    d = cfg.data
    out: Path = ctx.out
    if d.source == "shards":
        train, val = expand_urls(d.train_shards), expand_urls(d.val_shards)
        classes = None
    else:
        if d.source == "digits":
            items, labels = digits_items(d.image_size)
            classes = [str(i) for i in range(10)]
        else:
            items, labels, classes = imagefolder_items(Path(d.root))
        if len(classes) > d.num_classes:
            raise PipelineError(
                f"data.num_classes: {d.num_classes} but the source has {len(classes)} classes"
            )
        tr, va = stratified_split(labels, d.val_fraction, cfg.seed)
        log.info(f"prepare: {d.source}: {len(tr)} train / {len(va)} val samples, {len(classes)} classes")
        train = write_shards(out, "train", [items[i] for i in tr], d.samples_per_shard)
        val = write_shards(out, "val", [items[i] for i in va], d.samples_per_shard)
    root = ctx.runner.workdir
    manifest = {
        "train": [recorded_path(u, out, root) for u in train],
        "val": [recorded_path(u, out, root) for u in val],
        "classes": classes,
    }
    if d.source != "shards":  # the shards prepare wrote: checked by status (output_problems)
        manifest["sizes"] = {u: os.path.getsize(resolve_recorded(u, out)) for u in manifest["train"] + manifest["val"]}
    index, skipped = index_shards(train, val, out, root, d.source)
    manifest["skipped"] = skipped
    atomic_write_bytes(out / INDEX, [index])
    atomic_write_json(out / "shards.json", manifest)
    return {"train_shards": len(train), "val_shards": len(val), "classes": classes, "skipped_samples": len(skipped),
            "shards_json_sha256": file_digest(out / "shards.json"), "index_sha256": hashlib.sha256(index).hexdigest()}


def index_shards(train: list[str], val: list[str], out: Path, root: Path, source: str = "shards"
                 ) -> tuple[bytes, list[dict]]:
    """Scan the shards' tar headers once: the index's Parquet bytes (urls recorded relative to
    ``out``) and the samples that could not be indexed.  A split without samples and a key held
    twice are refused."""
    parts, skipped = [], []
    for split, urls in (("train", train), ("val", val)):
        samples, bad = scan_shards(urls)
        require_samples(split, urls, samples, bad, source)
        parts.append((split, samples))
        skipped += [{"split": split, "key": b.key, "url": recorded_path(b.url, out, root), "error": b.error}
                    for b in bad]
    check_unique_keys(Samples.concat([s for _, s in parts]))
    columns = ("label", "offset", "size", *RECORDED_COLUMNS)
    cols = {"split": [], "key": [], "url": [], **{c: [] for c in columns}}
    for split, s in parts:
        recorded = [recorded_path(u, out, root) for u in s.urls]
        cols["split"].append(pa.DictionaryArray.from_arrays(np.zeros(len(s), np.int32), [split]))
        cols["key"].append(s.key)
        cols["url"].append(pa.DictionaryArray.from_arrays(s.url, pa.array(recorded, pa.string())))
        for c in columns:
            cols[c].append(pa.array(getattr(s, c)))
    table = pa.table({k: pa.chunked_array(v) for k, v in cols.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue(), skipped


def require_samples(split: str, urls: list[str], samples: Samples, bad: list[BadSample], source: str) -> None:
    """Refuse a split without samples, naming it and its shards: every later stage would run on
    nothing (a teacher evaluated at 0%, a cache without val rows)."""
    if len(samples):
        return
    shown = ", ".join(urls[:3]) + (f", ... ({len(urls)} shards)" if len(urls) > 3 else "")
    why = f"; {len(bad)} skipped, first {bad[0].key}: {bad[0].error}" if bad else ""
    field, fix = ((f"data.{split}_shards", "list shards that hold samples") if source == "shards" else
                  (f"data.source {source}", "add images or change data.val_fraction"))
    raise PipelineError(f"{field}: the {split} split has no samples (shards: {shown or 'none'}{why}); {fix}")


def output_problems(out: Path, lock: dict) -> list[str]:
    """What is wrong with a finished prepare output now: an edited shard list, shards missing or
    resized since prepare wrote them (a damaged output is stale)."""
    f = out / "shards.json"
    try:
        m = read_json(f)
        if file_digest(f) != lock.get("summary", {}).get("shards_json_sha256"):
            return [f"{f} is not the one prepare wrote (sha256 mismatch)"]
    except (OSError, ValueError) as e:
        return [f"{f} cannot be read ({e})"]
    if not (out / INDEX).exists() or file_digest(out / INDEX) != lock.get("summary", {}).get("index_sha256"):
        return [f"{out / INDEX} is missing or not the one prepare wrote (sha256 mismatch)"]
    problems = []
    for u, size in m.get("sizes", {}).items():
        path = resolve_recorded(u, out)
        try:
            got = os.path.getsize(path)
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if got != size:
            problems.append(f"{path} is {got} bytes, prepare wrote {size}")
    return problems


