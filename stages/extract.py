"""extract: run the teacher once over every (sample, view) and write what students need.

1. Plan: read prepare's sample index, then lay out rows: train rows view-major (all samples of
   view 0, then view 1, ...), then val rows (one plain view).  Within each block the samples
   follow a seeded permutation keyed by their keys (a new one per view), so chunk-aligned reads
   hold a uniform mix of classes whatever order the input shards list the samples in.  Each train
   view's parameters are drawn from counter-based random numbers keyed by (seed, sample key, view)
   (:func:`stages.data.sample_views`) and stored explicitly in the manifest.  Everything is
   columnar: no Python object per row.
2. Teacher pass: eval + inference mode; ``forward_intermediates`` gives the logits and the
   selected layers (NCHW, prefix tokens dropped); spectra are rfft2(norm="ortho") in float32,
   stored as float16 at teacher width.
3. Write: rows are grouped by Zarr shard; DataLoader workers decode and build views while the
   teacher runs, and ``extract.writers`` threads compress and write finished shards behind a
   bounded queue.  Under torchrun rank r owns the shards s with s % world == r.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from cache.layout import CacheSpec, LayerSpec
from cache.reader import CACHE_DIR, Cache, cache_path, open_cache  # noqa: F401  (stages import them from here)
from cache.writer import CacheWriter
from pipeline import dist
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import recorded_path, resolve_recorded

from . import models, teacher as teacher_stage
from .data import ORDER_STREAM, VIEW_FIELDS, BatchViews, Rows, ViewDataset, layout_order, plain_views, sample_views
from .prepare import load_index
from .shards import Samples, check_labels
from .spectral import spectrum

log = logging.getLogger("pipeline")

# ----------------------------------------------------------------------------- plan


def plan_rows(cfg: PipelineConfig, train: Samples, val: Samples) -> tuple[Rows, list[dict]]:
    """The cache's rows and their (split, view) blocks: for each view a permutation of the train
    samples with that view's parameters, then the val samples (plain view) in a permutation too."""
    aug = cfg.data.augment
    samples = Samples.concat([train, val])
    h = samples.key_hashes()
    n_train = len(train)
    parts, blocks, start = [], [], 0
    for v in range(cfg.extract.views):
        order = layout_order(train, cfg.seed, ORDER_STREAM + v)
        parts.append(Rows(samples, order, sample_views(h[order], cfg.seed, v, aug.scale, aug.ratio, aug.hflip)))
        blocks.append({"split": "train", "view": v, "start": start, "stop": start + n_train})
        start += n_train
    order = n_train + layout_order(val, cfg.seed, ORDER_STREAM - 1)
    parts.append(Rows(samples, order, plain_views(len(val))))
    blocks.append({"split": "val", "view": 0, "start": start, "stop": start + len(val)})
    return Rows.concat(parts), blocks


def manifest_table(rows: Rows, blocks: list[dict], rows_per_shard: int, cache_dir: Path, workdir: Path) -> pa.Table:
    """The manifest: one row per cache row, as typed columns.  Shard urls are recorded relative to
    ``cache_dir`` when they lie in ``workdir`` (:func:`pipeline.fsutil.recorded_path`)."""
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
        **{f: rows.params[f] for f in VIEW_FIELDS},
        "shard": (np.arange(n) // rows_per_shard).astype(np.int32),
    }
    return pa.table(cols)


def manifest_rows(cache: Cache) -> Rows:
    """The rows of ``cache``'s manifest (see :func:`rows_of_manifest`)."""
    return rows_of_manifest(cache.manifest, cache.path)


def rows_of_manifest(m: pa.Table, base: Path) -> Rows:
    """The rows of a manifest, columnar: recorded urls resolved against ``base`` (the cache's
    folder), each sample stored once however many views it has."""
    url = m.column("url").combine_chunks()
    if not isinstance(url, pa.DictionaryArray):
        url = url.dictionary_encode()
    urls = [resolve_recorded(u, base) for u in url.dictionary.to_pylist()]
    url_idx = url.indices.to_numpy(zero_copy_only=False).astype(np.int64)

    def col(name: str) -> np.ndarray:
        return m.column(name).to_numpy()

    offset = col("offset").astype(np.int64)
    _, first, sample = np.unique((url_idx << 40) | offset, return_index=True, return_inverse=True)
    samples = Samples(urls, url_idx[first].astype(np.int32), m.column("key").combine_chunks().take(pa.array(first)),
                      col("label")[first].astype(np.int64), offset[first], col("size")[first].astype(np.int64))
    return Rows(samples, sample.reshape(-1), {f: col(f) for f in VIEW_FIELDS})


@torch.inference_mode()
def layer_specs(model, layers: tuple[int, ...], size: int, device) -> list[LayerSpec]:
    """The cached layers (normalized indices) with their names and feature shapes."""
    x = torch.zeros(1, 3, size, size, device=device)
    _, feats = models.intermediates(model, x, list(layers))
    names = models.layer_names(model, list(layers))
    out = []
    for idx, name, f in zip(layers, names, feats):
        if f.ndim != 4:
            raise PipelineError(f"extract.layers: layer {idx} ({name}) is not a 2-D feature map: {tuple(f.shape)}")
        out.append(LayerSpec(idx, name, int(f.shape[1]), int(f.shape[2]), int(f.shape[3])))
    return out


class ShardBatches(torch.utils.data.Sampler):
    """Batches of row indices that never cross a shard boundary, for the given shards in order."""

    def __init__(self, spec: CacheSpec, shards: list[int], batch_size: int):
        self.batches = []
        for s in shards:
            a, b = spec.shard_rows(s)
            for i in range(a, b, batch_size):
                self.batches.append(list(range(i, min(b, i + batch_size))))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Writers:
    """Threads that write finished shards behind a bounded queue, so the teacher never waits on
    compression or fsync.  Each shard goes to exactly one thread (writers own whole shards)."""

    def __init__(self, writer: CacheWriter, threads: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=threads + 1)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"cache-writer-{i}")
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain; the first error is re-raised in the main thread
            try:
                self.writer.write_shard(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        if not self.threads:  # writers: 0 -> write in the calling thread
            self.writer.write_shard(*item)
            return
        self.q.put(item)

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(ctx) -> dict:
    cfg: PipelineConfig = ctx.cfg
    e = cfg.extract
    t_start = time.time()
    trec = ctx.upstream["teacher"]
    train, val, skipped = load_index(ctx.upstream["prepare"])
    check_labels(train, cfg.data.num_classes)
    check_labels(val, cfg.data.num_classes)
    skipped = [{"key": b["key"], "url": b["url"], "error": b["error"]} for b in skipped]
    if skipped and cfg.data.on_bad_sample == "fail":
        b = skipped[0]
        raise PipelineError(f"{b['url']}: bad sample {b['key']}: {b['error']} (data.on_bad_sample: fail)")
    for b in skipped:
        if dist.is_main():
            log.warning(f"extract: skipping sample {b['key']} in {b['url']}: {b['error']}")

    device = models.resolve_device(e.device)
    model = teacher_stage.load(trec, cfg).to(device)
    path = Path(ctx.out) / CACHE_DIR
    rows, blocks = plan_rows(cfg, train, val)
    manifest = manifest_table(rows, blocks, e.rows_per_shard, path, ctx.runner.workdir)
    spec = CacheSpec(
        rows=len(rows),
        rows_per_shard=e.rows_per_shard,
        num_classes=cfg.data.num_classes,
        layers=layer_specs(model, ctx.runner.model_plan.teacher_layers, cfg.data.image_size, device),
        store=tuple(e.store),
        chunk_bytes=e.chunk_bytes,
        compressor=e.compressor,
        clevel=e.clevel,
    )
    writer = CacheWriter(path, spec)
    attrs = {
        "fingerprint": ctx.fingerprint,
        "inputs": ctx.inputs,
        "config": cfg.model_dump(mode="json"),
        "teacher": {
            "model": cfg.teacher.model,
            "kwargs": cfg.teacher.kwargs,
            "weights_sha256": trec.summary.get("weights_sha256"),
            "fingerprint": trec.lock["fingerprint"],
        },
        "layers": [{"index": l.index, "name": l.name, "shape": [l.channels, l.height, l.width]} for l in spec.layers],
        "views": e.views,
        "blocks": blocks,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "spectrum": {"fft": "rfft2", "axes": ["H", "W"], "norm": "ortho", "compute_dtype": "float32",
                     "last_axis": ["real", "imag"]},
        "skipped_samples": skipped,
        "versions": ctx.runner.versions,
    }
    if dist.is_main():
        resumed = writer.create_or_resume(attrs, manifest, fresh=ctx.forced)
    dist.barrier()
    if not dist.is_main():
        resumed = writer.create_or_resume(attrs, manifest)
    done = writer.completed()
    mine = [s for s in range(spec.num_shards) if s % dist.world_size() == dist.rank()]
    todo = [s for s in mine if s not in done]
    if dist.is_main() and resumed:
        log.info(f"extract: resuming, {len(done)}/{spec.num_shards} shards already complete")
    n_todo = sum(spec.shard_rows(s)[1] - spec.shard_rows(s)[0] for s in todo)
    t_pass = time.time()
    split = {}
    if todo:
        split = _teacher_pass(cfg, model, device, rows, spec, todo, writer, n_todo)
    pass_s = time.time() - t_pass
    dist.barrier()
    summary: dict = {"rows": spec.rows, "shards": spec.num_shards, "rows_computed": n_todo,
                     "teacher_pass_s": round(pass_s, 3), "teacher_pass_split": split}
    if dist.is_main():
        fin = writer.finalize({"extract_seconds": round(time.time() - t_start, 2)})
        layer_arrays = {**spec.layer_arrays("spectra"), **spec.layer_arrays("features")}
        raw32 = {n: b * 2 for n, b in spec.bytes_per_row().items() if n in layer_arrays}
        stored = {n: _du(path / n) for n in raw32}
        views = spec.rows
        summary.update({
            "bad_rows": len(fin["bad_rows"]),
            "skipped_samples": len(skipped),
            "cache_bytes": _du(path),
            "bytes_per_view": {n: round(stored[n] / views, 1) for n in stored},
            "compression_vs_float32": {n: round(raw32[n] * views / max(1, stored[n]), 2) for n in stored},
        })
        log.info(
            f"extract: {spec.rows} rows in {spec.num_shards} shards, {summary['cache_bytes'] / 2**20:.1f} MiB, "
            f"{summary['bad_rows']} bad rows, {len(skipped)} skipped samples"
        )
    return summary


@torch.inference_mode()
def _teacher_pass(cfg, model, device, rows, spec: CacheSpec, todo, writer, n_todo) -> dict:
    e = cfg.extract
    ds = ViewDataset.for_config(rows, cfg.data)
    workers = models.resolve_workers(e.num_workers, device)
    loader = torch.utils.data.DataLoader(
        BatchViews(ds),
        sampler=ShardBatches(spec, todo, e.batch_size),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    arrays = spec.arrays()
    layer_of = spec.layer_arrays("spectra")
    feat_of = spec.layer_arrays("features")
    wt = _Writers(writer, e.writers)
    cur, buf, bad = -1, {}, []

    def flush():
        if cur >= 0:
            wt.put((cur, buf, bad))

    bar = tqdm(total=n_todo, desc="extract", unit="row", disable=not dist.is_main() or None, smoothing=0.1)
    # where the wall time goes: data wait, teacher forward, spectra + copies, writer backpressure
    tm = {"data": 0.0, "teacher": 0.0, "spectra": 0.0, "writer": 0.0}
    t_all = time.perf_counter()
    t = t_all
    try:
        for x, _, ok, idx in loader:
            now = time.perf_counter()
            tm["data"] += now - t
            s = int(idx[0]) // spec.rows_per_shard
            if s != cur:
                flush()
                tw = time.perf_counter()
                tm["writer"] += tw - now
                now = tw
                cur = s
                a, b = spec.shard_rows(s)
                buf = {n: np.zeros((b - a, *shape), dtype=dt) for n, (shape, dt) in arrays.items()}
                bad = []
            a = cur * spec.rows_per_shard
            local = (idx - a).numpy()
            okn = ok.numpy().astype(bool)
            if not okn.all():
                for j in np.flatnonzero(~okn):
                    r = int(idx[j])
                    sm = rows.source(r)
                    if cfg.data.on_bad_sample == "fail":
                        raise PipelineError(f"{sm.url}: cannot decode image of sample {sm.key} "
                                            f"(row {r}; data.on_bad_sample: fail)")
                    log.warning(f"extract: bad image {sm.key} in {sm.url} (row {r}): skipped")
                    bad.append({"row": r, "key": sm.key, "url": sm.url, "error": "cannot decode image"})
            x = ds.normalize(x.to(device, non_blocking=True))
            with models.autocast(device, e.amp):
                logits, feats = models.intermediates(model, x, [l.index for l in spec.layers])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_fwd = time.perf_counter()
            tm["teacher"] += t_fwd - now
            out = {"logits": logits.float()}
            for n, i in layer_of.items():
                if n in arrays:
                    out[n] = spectrum(feats[i])
            for n, i in feat_of.items():
                if n in arrays:
                    out[n] = feats[i].float()
            # one device-to-host copy for every array of the batch
            names = list(out)
            flat = torch.cat([out[n].to(torch.float16).reshape(len(idx), -1) for n in names], dim=1).cpu().numpy()
            flat[~okn] = 0
            col = 0
            for n in names:
                width = int(np.prod(arrays[n][0]))
                buf[n][local] = flat[:, col : col + width].reshape(len(idx), *arrays[n][0])
                col += width
            buf["valid"][local] = okn.astype(np.uint8)
            bar.update(len(idx))
            t = time.perf_counter()
            tm["spectra"] += t - t_fwd
        tw = time.perf_counter()
        flush()
        cur = -1
    finally:
        bar.close()
        wt.close()
    tm["writer"] += time.perf_counter() - tw
    total = time.perf_counter() - t_all
    split = {k: round(v / max(total, 1e-9), 3) for k, v in tm.items()}
    log.info(
        f"extract: teacher pass {n_todo / max(total, 1e-9):.0f} rows/s; time in "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in split.items())
    )
    return split
