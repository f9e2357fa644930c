"""extract: run the teacher once over every (sample, view) and write what students need.

1. Plan: read prepare's sample index, then lay out rows: train rows view-major (all samples of
   view 0, then view 1, ...), then val rows (one eval view).  Within each block the samples
   follow a seeded permutation keyed by their keys (a new one per view), so chunk-aligned reads
   hold a uniform mix of classes whatever order the input shards list the samples in.  Each train
   view's parameters are drawn from counter-based random numbers keyed by (seed, sample key, view)
   (:func:`stages.views.sample_views`) and stored explicitly in the manifest.  Everything is
   columnar: no Python object per row.
2. Teacher pass: eval + inference mode; ``forward_intermediates`` gives the logits and the
   selected layers (NCHW, prefix tokens dropped), average-pooled along channels where
   ``extract.compress.pool`` asks; spectra are rfft2(norm="ortho") in float32, encoded by
   :mod:`cache.codec` (Hermitian-packed float16 by default, int8 with ``quantize: int8``; with
   ``quantize: step`` the layers' quantization tables are calibrated first, on the teacher's
   spectra of the cache's first rows computed in the pass's own batches: :func:`calibrate`).
3. Write: rows are grouped by Zarr shard; DataLoader workers decode and build views while the
   teacher runs, and ``extract.writers`` threads compress and write finished shards behind a
   bounded queue.  Under torchrun rank r owns the shards s with s % world == r.  A batch whose
   stored values (a read row's, in the stored dtype) are not finite stops the pass naming the
   array and rows: the cache is never marked complete with them.

With ``extract.location`` (a store URL) the cache is ``<location>/<fingerprint[:12]>/cache.zarr``,
the output folder keeping the record: ranks on nodes that share only the store find it from the config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from cache.codec import pack
from cache.encoding import cache_sizes, calibrated_spec, encoded_layers, resumed_spec
from cache.layout import CacheSpec, LayerSpec, root_attributes, spec_from_attrs
from cache.manifest import manifest_table
from cache.reader import CACHE_DIR, CACHE_URL, Cache, cache_path, commit_problems
from cache.writer import CacheWriter
from pipeline import dist
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.storage import Location

from . import models
from .data import ORDER_STREAM, Rows, ViewDataset, layout_order, view_loader
from .shard_buffers import ShardBatches, ShardBuffers, ShardWriters
from .shards import Samples, check_labels, load_index
from .spectral import pool_channels, spectrum
from .views import RA_OPS, ViewPolicy, place_block, sample_views, val_views

log = logging.getLogger("pipeline")

# ----------------------------------------------------------------------------- plan


def plan_rows(cfg: PipelineConfig, train: Samples, val: Samples) -> tuple[Rows, list[dict]]:
    """The cache's rows and their (split, view) blocks: for each view a permutation of the train
    samples with that view's parameters, then the val samples (eval views) in a permutation too."""
    policy = ViewPolicy.of(cfg.data)
    samples = Samples.concat([train, val])
    h = samples.key_hashes()
    n_train = len(train)
    parts, blocks, start = [], [], 0
    for v in range(cfg.extract.views):
        order = layout_order(train, cfg.seed, ORDER_STREAM + v)
        parts.append(Rows(samples, order, place_block(sample_views(h[order], cfg.seed, v, policy), start)))
        blocks.append({"split": "train", "view": v, "start": start, "stop": start + n_train})
        start += n_train
    order = n_train + layout_order(val, cfg.seed, ORDER_STREAM - 1)
    parts.append(Rows(samples, order, val_views(len(val), policy)))
    blocks.append({"split": "val", "view": 0, "start": start, "stop": start + len(val)})
    return Rows.concat(parts), blocks


def teacher_forward(model, x: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the features of teacher layers ``indices`` in that order).  timm's
    ``forward_intermediates`` hands back the layers it takes in block order whatever order they are
    asked in, and ``extract.layers`` may list them in any order (``[7, 0]``, ``[-1, 0]``): each
    cached array must hold its own layer."""
    order = sorted(indices)
    logits, feats = models.intermediates(model, x, order)
    taken = dict(zip(order, feats))
    return logits, [taken[i] for i in indices]


@torch.inference_mode()
def layer_specs(model, layers: tuple[int, ...], size: int, device, pool: list[int | None]) -> list[LayerSpec]:
    """The cached layers (normalized indices) with their names, feature shapes and the width each
    is pooled to (``extract.compress.pool``, one entry per layer)."""
    x = torch.zeros(1, 3, size, size, device=device)
    _, feats = teacher_forward(model, x, list(layers))
    names = models.layer_names(model, list(layers))
    out = []
    for idx, name, f, width in zip(layers, names, feats, pool):
        if f.ndim != 4:
            raise PipelineError(f"extract.layers: layer {idx} ({name}) is not a 2-D feature map: {tuple(f.shape)}")
        if width is not None and width > f.shape[1]:
            raise PipelineError(f"extract.compress.pool: {width} channels for layer {idx} ({name}), which has only "
                                f"{f.shape[1]}: pooling only narrows")
        pooled = width if width is not None and width != f.shape[1] else None
        out.append(LayerSpec(idx, name, int(f.shape[1]), int(f.shape[2]), int(f.shape[3]), pooled))
    return out


def cache_location(cfg: PipelineConfig, out: Path, fingerprint: str) -> Location:
    """Where extract writes the cache: ``cache.zarr`` in its output folder, or with
    ``extract.location`` under ``<location>/<fingerprint[:12]>/`` on the store."""
    if cfg.extract.location:
        return Location(cfg.extract.location) / fingerprint[:12] / CACHE_DIR
    return Location(Path(out) / CACHE_DIR)


def output_problems(runner, out: Path, lock: dict) -> list[str]:
    """A file of the cache's commit missing, locally or on the store the record names."""
    return commit_problems(cache_path(SimpleNamespace(path=out, lock=lock)))


def run(ctx) -> dict:
    """Plan the rows, open (or resume) the cache, run the teacher over this rank's missing shards,
    then mark the cache complete."""
    cfg: PipelineConfig = ctx.cfg
    e = cfg.extract
    t_start = time.time()
    train, val, skipped = _samples(cfg, ctx.upstream["prepare"])
    device = models.resolve_device(e.device)
    model = models.load_teacher(ctx.upstream["teacher"], cfg).to(device)
    path = cache_location(cfg, ctx.out, ctx.fingerprint)
    rows, blocks = plan_rows(cfg, train, val)
    spec = CacheSpec(
        rows=len(rows), rows_per_shard=e.rows_per_shard, num_classes=cfg.data.num_classes,
        layers=layer_specs(model, ctx.runner.model_plan.teacher_layers, cfg.data.image_size, device,
                           e.pool_widths()),
        store=tuple(e.store), chunk_bytes=e.chunk_bytes, compressor=e.resolved_compressor(), clevel=e.clevel,
        packed=e.compress.packed, quantize=e.compress.quantize,
        error=e.compress.error if e.compress.quantize == "step" else None,
    )
    if spec.quantize == "step" and dist.is_main():
        spec = resumed_spec(path, ctx.fingerprint, ctx.forced) or calibrate(cfg, model, device, rows, spec)
    writer = CacheWriter(path, spec)
    todo = _open_cache_shards(ctx, writer, cache_attrs(ctx, spec, blocks, skipped),
                              manifest_table(rows, blocks, e.rows_per_shard, path, ctx.runner.workdir,
                                             codes={"ra_op": RA_OPS}))
    spec = writer.spec
    n_todo = sum(spec.shard_rows(s)[1] - spec.shard_rows(s)[0] for s in todo)
    t_pass = time.time()
    split = _teacher_pass(cfg, model, device, rows, spec, todo, writer, n_todo) if todo else {}
    pass_s = time.time() - t_pass
    dist.barrier()
    summary: dict = {"rows": spec.rows, "shards": spec.num_shards, "rows_computed": n_todo,
                     "teacher_pass_s": round(pass_s, 3), "teacher_pass_split": split,
                     **({CACHE_URL: str(path)} if path.remote else {})}
    if dist.is_main():
        fin = writer.finalize({"extract_seconds": round(time.time() - t_start, 2)})
        summary.update({"bad_rows": len(fin["bad_rows"]), "skipped_samples": len(skipped), **cache_sizes(path, spec)})
        log.info(
            f"extract: {spec.rows} rows in {spec.num_shards} shards, {summary['cache_bytes'] / 2**20:.1f} MiB, "
            f"{summary['bad_rows']} bad rows, {len(skipped)} skipped samples"
        )
        summary["teacher_val_top1"] = report_cached_val_top1(Cache(path), ctx.upstream["teacher"].summary)
    return summary


def cached_val_top1(cache: Cache) -> float:
    """Top-1 (percent) of the cached teacher logits on the val views (rows extract could read)."""
    b = cache.block("val", 0)
    ok = cache.valid[b.start : b.stop]
    logits = cache.read("logits", b.start, b.stop)[ok]
    labels = cache.column("label")[b.start : b.stop][ok]
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels)) if len(labels) else float("nan")


def report_cached_val_top1(cache: Cache, teacher_summary: dict) -> float:
    """Log the cached logits' val top-1, so that wrong weights or preprocessing show at once; warn
    when it is more than a point from the teacher stage's own evaluation of the same views."""
    top1 = cached_val_top1(cache)
    fitted = teacher_summary.get("val_top1")
    log.info(f"extract: teacher val top-1 on the cached val views {top1:.2f}%"
             + (f" (teacher stage: {fitted:.2f}%)" if fitted is not None else ""))
    if fitted is not None and abs(top1 - fitted) > 1.0:
        log.warning(f"extract: the cached logits give val top-1 {top1:.2f}%, the teacher stage measured "
                    f"{fitted:.2f}% on the same views; the teacher's weights or preprocessing differ between them")
    return round(top1, 3)


def _samples(cfg: PipelineConfig, prepare_record) -> tuple[Samples, Samples, list[dict]]:
    """Prepare's train and val samples, labels checked; samples prepare could not index are
    skipped (logged, recorded) or, with ``data.on_bad_sample: fail``, an error naming the first."""
    train, val, skipped = load_index(prepare_record)
    check_labels(train, cfg.data.num_classes)
    check_labels(val, cfg.data.num_classes)
    skipped = [{"key": b["key"], "url": b["url"], "error": b["error"]} for b in skipped]
    if skipped and cfg.data.on_bad_sample == "fail":
        b = skipped[0]
        raise PipelineError(f"{b['url']}: bad sample {b['key']}: {b['error']} (data.on_bad_sample: fail)")
    for b in skipped:
        if dist.is_main():
            log.warning(f"extract: skipping sample {b['key']} in {b['url']}: {b['error']}")
    return train, val, skipped


def normalization_attrs(cfg: PipelineConfig) -> dict:
    """What the teacher's input was normalized with, for the cache's ``teacher`` attribute."""
    n = models.teacher_normalization(cfg)
    return {"mean": list(n.mean), "std": list(n.std), "normalization": n.source}


def cache_attrs(ctx, spec: CacheSpec, blocks: list[dict], skipped: list[dict]) -> dict:
    """The cache's root attributes (:func:`cache.layout.root_attributes`) for this run."""
    cfg, teacher_rec = ctx.cfg, ctx.upstream["teacher"]
    teacher = {"model": cfg.teacher.model, "kwargs": cfg.teacher.kwargs,
               "weights_sha256": teacher_rec.summary.get("weights_sha256"),
               "fingerprint": teacher_rec.lock["fingerprint"], **normalization_attrs(cfg)}
    return root_attributes(ctx.fingerprint, ctx.inputs, cfg.model_dump(mode="json"), teacher, spec, cfg.extract.views,
                           blocks, cfg.data, skipped, ctx.runner.versions)


def _open_cache_shards(ctx, writer: CacheWriter, attrs: dict, manifest: pa.Table) -> list[int]:
    """Create or resume the cache (rank 0 first); the shards this rank still has to write."""
    if dist.is_main():
        resumed = writer.create_or_resume(attrs, manifest, fresh=ctx.forced)
        if resumed and (damaged := writer.unmark_damaged()):
            log.warning(f"extract: shards {damaged[:10]} of {writer.path} have files unlike those extract wrote "
                        f"(deleted, emptied or truncated); writing them again")
    dist.barrier()
    if not dist.is_main():
        resumed = writer.create_or_resume(attrs, manifest)
    if not dist.is_main() and writer.spec.quantize == "step":  # the tables rank 0 calibrated (or resumed)
        writer.spec = spec_from_attrs(dict(writer.group.attrs)["spec"])
    done = writer.completed()
    n = writer.spec.num_shards
    if dist.is_main() and resumed:
        log.info(f"extract: resuming, {len(done)}/{n} shards already complete")
    return [s for s in range(n) if s % dist.world_size() == dist.rank() and s not in done]


@torch.inference_mode()
def _teacher_pass(cfg, model, device, rows: Rows, spec: CacheSpec, todo: list[int], writer: CacheWriter,
                  n_todo: int) -> dict:
    """The paper's step over this rank's shards: each batch of views through the teacher, the
    selected layers' spectra, into shard buffers that writer threads compress and write.  Returns
    the fractions of wall time spent waiting for data, in the teacher, on spectra and copies, and
    waiting for the writers."""
    e = cfg.extract
    ds = ViewDataset.for_config(rows, cfg.data, models.teacher_normalization(cfg))
    shards = ShardBuffers(spec, ShardWriters(writer, e.writers), writer.path)
    indices = [layer.index for layer in spec.layers]
    bar = tqdm(total=n_todo, desc="extract", unit="row", disable=not dist.is_main() or None, smoothing=0.1)
    seconds = {"data": 0.0, "teacher": 0.0, "spectra": 0.0, "writer": 0.0}
    t_all = t = time.perf_counter()
    try:
        for x, _, ok, idx in _view_loader(ds, spec, todo, e, device):
            now = time.perf_counter()
            seconds["data"] += now - t
            seconds["writer"] += shards.start(int(idx[0]) // spec.rows_per_shard)
            okn = ok.numpy().astype(bool)
            bad = _bad_rows(cfg, rows, idx, okn)
            t_fwd = time.perf_counter()
            with models.autocast(device, e.amp):
                logits, feats = teacher_forward(model, ds.normalize(x.to(device, non_blocking=True), idx), indices)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            seconds["teacher"] += t - t_fwd
            shards.add(idx.numpy(), teacher_targets(logits, feats, spec), okn, bad)
            bar.update(len(idx))
            t_done = time.perf_counter()
            seconds["spectra"] += t_done - t
            t = t_done
        seconds["writer"] += shards.start(-1)
    finally:
        bar.close()
        shards.close()
    total = time.perf_counter() - t_all
    split = {k: round(v / max(total, 1e-9), 3) for k, v in seconds.items()}
    log.info(
        f"extract: teacher pass {n_todo / max(total, 1e-9):.0f} rows/s; time in "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in split.items())
    )
    return split


def teacher_targets(logits: torch.Tensor, feats: list[torch.Tensor], spec: CacheSpec) -> dict[str, torch.Tensor]:
    """What the cache stores of one batch, by array name: the logits, the spectrum
    rfft2(X, norm="ortho") of each cached layer's features (pooled to the layer's stored width
    first), encoded by :mod:`cache.codec`, and the features when stored."""
    out = {"logits": logits.float()}
    for i, parts in encoded_layers(spec, {spec.layers[i].name: dense_spectrum(feats[i], spec.layers[i])
                                          for i in spec.layer_arrays("spectra").values()}).items():
        out.update({spec.spectrum_parts(spec.layers[i])[part]: t for part, t in parts.items()})
    for name, i in spec.layer_arrays("features").items():
        out[name] = feats[i].float()
    return out


def dense_spectrum(feats: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """The float32 spectrum a layer's features are cached as: pooled to the stored width, rfft2."""
    return spectrum(pool_channels(feats, layer.stored_channels))


def calibration_rows(spec: CacheSpec, calibrate_rows: int, batch_size: int) -> list[list[int]]:
    """The batches of the cache's first ``calibrate_rows`` rows, exactly as the teacher pass batches
    them (:class:`ShardBatches`: whole batches, so the teacher computes the same numbers)."""
    out, n = [], 0
    for batch in ShardBatches(spec, list(range(spec.num_shards)), batch_size).batches:
        if n >= min(calibrate_rows, spec.rows):
            break
        out.append(batch)
        n += len(batch)
    return out


@torch.inference_mode()
def calibrate(cfg: PipelineConfig, model, device, rows: Rows, spec: CacheSpec) -> CacheSpec:
    """The spec with its quantization tables, from the teacher's float16 spectra of the cache's first
    ``extract.compress.calibrate_rows`` rows (a train view-0 block: a seeded mix of classes), each
    computed in the batch the teacher pass computes it in, unreadable rows zero as the cache stores
    them."""
    e = cfg.extract
    ds = ViewDataset.for_config(rows, cfg.data, models.teacher_normalization(cfg))
    batches = calibration_rows(spec, e.compress.calibrate_rows, e.batch_size)
    indices = [layer.index for layer in spec.layers]
    parts: dict[str, list[np.ndarray]] = {layer.name: [] for layer in spec.layers}
    for x, _, ok, idx in view_loader(ds, batches, 0):
        with models.autocast(device, e.amp):
            _, feats = models.intermediates(model, ds.normalize(x.to(device), idx), indices)
        for layer, f in zip(spec.layers, feats):
            values = pack(dense_spectrum(f, layer).to(torch.float16), layer.width).float().cpu().numpy()
            values[~ok.numpy().astype(bool)] = 0
            parts[layer.name].append(values)
    n = e.compress.calibrate_rows
    log.info(f"extract: calibrating quantization tables to a relative error of {spec.error:g} on "
             f"{min(n, spec.rows)} rows")
    return calibrated_spec(spec, {k: np.concatenate(v)[:n] for k, v in parts.items()}, e.compress.delta,
                           e.compress.basis)


def _view_loader(ds: ViewDataset, spec: CacheSpec, todo: list[int], e, device) -> torch.utils.data.DataLoader:
    """Batches of uint8 views of ``todo``'s rows, shard by shard, built in worker processes."""
    return view_loader(ds, ShardBatches(spec, todo, e.batch_size), models.resolve_workers(e.num_workers, device),
                       pin_memory=device.type == "cuda", prefetch=4)


def _bad_rows(cfg: PipelineConfig, rows: Rows, idx: torch.Tensor, ok: np.ndarray) -> list[dict]:
    """The batch's rows whose image could not be decoded: recorded, or an error under
    ``data.on_bad_sample: fail``."""
    bad = []
    for j in np.flatnonzero(~ok):
        r = int(idx[j])
        sm = rows.source(r)
        if cfg.data.on_bad_sample == "fail":
            raise PipelineError(f"{sm.url}: cannot decode image of sample {sm.key} (row {r}; data.on_bad_sample: fail)")
        log.warning(f"extract: bad image {sm.key} in {sm.url} (row {r}): skipped")
        bad.append({"row": r, "key": sm.key, "url": sm.url, "error": "cannot decode image"})
    return bad


