"""teacher: resolve the teacher model: timm hub weights, a local checkpoint, and/or a fit.

Output: ``model.pt`` (the weights), the sha256 digest of the weights (recorded in the lock and in
every cache made from them) and the val top-1.  The default fits a small CaiT on the embedded
digits shards with timm's AdamW and cosine schedule on views of `data.augment`, keeping the best epoch.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_torch_save

from . import models
from .data import (FIT_STREAM, ORDER_STREAM, Rows, ViewDataset, layout_order, sequential_batches, shuffled_batches,
                   view_loader)
from .shards import Samples, check_labels, load_index
from .train import evaluate, optimizer, schedule
from .views import ViewPolicy, sample_views, val_views

log = logging.getLogger("pipeline")


def build(cfg: PipelineConfig) -> torch.nn.Module:
    t = cfg.teacher
    return models.create(t.model, t.kwargs, cfg.data.num_classes, t.pretrained, t.checkpoint)


def eval_rows(samples: Samples, cfg: PipelineConfig) -> Rows:
    """Every sample once, as its eval view (``data.eval``)."""
    return Rows(samples, np.arange(len(samples)), val_views(len(samples), ViewPolicy.of(cfg.data)))


def _loader(ds: ViewDataset, batch_size, shuffle, workers, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(len(ds), batch_size, g) if shuffle else sequential_batches(range(len(ds)), batch_size)
    return view_loader(ds, batches, workers, generator=g)


def _images_labels(loader, bad: set, num_classes: int | None = None):
    """(normalized images, labels) of a ViewDataset loader, bad rows dropped and recorded; with
    ``num_classes``, the labels are the training targets (mixed, with mixing)."""
    for x, y, ok, idx in loader:
        x = loader.dataset.views.normalize(x, idx)
        if num_classes is not None:
            y = loader.dataset.views.label_targets(y, idx, num_classes)
        if not bool(ok.all()):
            for i in idx[~ok].tolist():
                bad.add(i)
            x, y = x[ok], y[ok]
            if len(y) == 0:
                continue
        yield x, y


def fit(model, cfg: PipelineConfig, train, val, device) -> dict:
    f = cfg.teacher.fit
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = optimizer(model, f.optimizer, f.lr, f.weight_decay)
    steps_per_epoch = (len(train) + f.batch_size - 1) // f.batch_size
    sched = schedule(opt, f.epochs * steps_per_epoch, int(f.warmup_epochs * steps_per_epoch), f.lr, f.warmup_lr,
                     f.min_lr)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
    norm = models.teacher_normalization(cfg)
    val_loader = _loader(ViewDataset.for_config(eval_rows(val, cfg), cfg.data, norm), 256, False, f.num_workers)
    # one dataset: its decoded images serve every epoch; each epoch draws new views for every sample
    train_views = ViewDataset.for_config(eval_rows(train, cfg), cfg.data, norm)
    key_hash = train.key_hashes()
    best = {"top1": -1.0}
    best_state = None
    bad: set = set()
    history = []
    for epoch in range(f.epochs):
        t0 = time.time()
        train_views.rows.params = sample_views(key_hash, cfg.seed, FIT_STREAM + epoch, train_views.policy)
        loader = _loader(train_views, f.batch_size, True, f.num_workers, seed=cfg.seed * 1000 + epoch)
        model.train()
        tot, n = 0.0, 0
        for x, y in tqdm(_images_labels(loader, bad, cfg.data.num_classes), total=steps_per_epoch,
                         desc=f"teacher fit {epoch + 1}/{f.epochs}",
                         leave=False, disable=None):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(y)
            n += len(y)
        ev = evaluate(model, _images_labels(val_loader, bad), device)
        history.append({"epoch": epoch, "train_loss": tot / max(1, n), "val_top1": ev["top1"]})
        log.info(
            f"teacher fit epoch {epoch + 1}/{f.epochs}: loss {tot / max(1, n):.4f} "
            f"val top-1 {ev['top1']:.2f}% ({time.time() - t0:.1f}s)"
        )
        if ev["top1"] > best["top1"]:
            best = {**ev, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"best_epoch": best["epoch"], "history": history, "bad_samples": len(bad)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    t0 = time.time()
    train, val, skipped = load_index(ctx.upstream["prepare"])
    train = train.take(layout_order(train, cfg.seed, ORDER_STREAM - 2))  # the fit ignores the input order
    check_labels(train, cfg.data.num_classes)
    check_labels(val, cfg.data.num_classes)
    for b in skipped:
        log.warning(f"teacher: skipping bad sample {b['key']} in {b['url']}: {b['error']}")
    if cfg.data.on_bad_sample == "fail" and skipped:
        b = skipped[0]
        raise PipelineError(f"{b['url']}: bad sample {b['key']}: {b['error']} (data.on_bad_sample: fail)")
    device = models.resolve_device(cfg.teacher.device)
    torch.manual_seed(cfg.seed)  # a teacher that is not loaded from weights starts from seeded ones
    model = build(cfg)
    info: dict = {}
    if cfg.teacher.fit is not None:
        info = fit(model, cfg, train, val, device)
    model.to(device)
    val_views = ViewDataset.for_config(eval_rows(val, cfg), cfg.data, models.teacher_normalization(cfg))
    ev = evaluate(model, _images_labels(_loader(val_views, 256, False, 0), set()), device)
    model.cpu()
    atomic_torch_save(ctx.out / "model.pt", {"state_dict": model.state_dict(), "model": cfg.teacher.model,
                                             "kwargs": cfg.teacher.kwargs})
    digest = models.weights_digest(model)
    log.info(f"teacher: val top-1 {ev['top1']:.2f}% top-5 {ev['top5']:.2f}% (weights {digest[:12]})")
    return {
        "val_top1": ev["top1"],
        "val_top5": ev["top5"],
        "weights_sha256": digest,
        "params": sum(p.numel() for p in model.parameters()),
        "fit_seconds": round(time.time() - t0, 1),
        **info,
    }
