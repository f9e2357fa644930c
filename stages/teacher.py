"""teacher: resolve the teacher model: timm hub weights, a local checkpoint, and/or a fit.

Output: ``model.pt`` (the weights), the sha256 digest of the weights (recorded in the lock and in
every cache made from them) and the val top-1.  The default fits a small CaiT on the embedded
digits shards with timm's AdamW and cosine schedule on views of `data.augment`, keeping the best epoch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cache.verify import DIGESTS, digest_problems, file_digests
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_torch_save

from . import models
from .data import (FIT_STREAM, ORDER_STREAM, Rows, ViewDataset, layout_order, sequential_batches, shuffled_batches,
                   view_loader)
from .shards import Samples, check_labels, load_index
from .train import evaluate, load_checkpoint, non_finite_parameter, optimizer, schedule
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


MODEL = "model.pt"  # the teacher's weights; the record holds their digest and the file's sha256
FIT_CKPT = "fit_ckpt.pt"  # the fit's state after its last finished epoch; a rerun resumes from it


class NonFiniteFit(PipelineError):
    """The teacher fit's loss or weights became inf or nan: the fit stops before the step, the stage
    is not recorded, and a rerun retries it (from the last finished epoch's checkpoint)."""

    retryable = True


def fit(model, cfg: PipelineConfig, train, val, device, ckpt: Path | None = None) -> dict:
    """Fit ``model`` on ``train`` and keep its best epoch on ``val``.  With ``ckpt``, the fit's whole
    state is saved there after every epoch and a rerun resumes from it, ending as an uninterrupted
    fit would (same weights, history and bad samples)."""
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
    state = _resume(ckpt, model, opt, sched, device) if ckpt is not None else None
    state = state or {"epoch": -1, "best": {"top1": -1.0}, "best_state": None, "history": [], "bad": []}
    best, best_state, history, bad = state["best"], state["best_state"], state["history"], set(state["bad"])
    for epoch in range(state["epoch"] + 1, f.epochs):
        t0 = time.time()
        train_views.rows.params = sample_views(key_hash, cfg.seed, FIT_STREAM + epoch, train_views.policy)
        loader = _loader(train_views, f.batch_size, True, f.num_workers, seed=cfg.seed * 1000 + epoch)
        loss = _train_epoch(model, opt, sched, crit, _images_labels(loader, bad, cfg.data.num_classes), device,
                            epoch, f.epochs, steps_per_epoch)
        _check_finite_weights(model, epoch)
        ev = evaluate(model, _images_labels(val_loader, bad), device)
        history.append({"epoch": epoch, "train_loss": loss, "val_top1": ev["top1"]})
        log.info(
            f"teacher fit epoch {epoch + 1}/{f.epochs}: loss {loss:.4f} "
            f"val top-1 {ev['top1']:.2f}% ({time.time() - t0:.1f}s)"
        )
        if ev["top1"] > best["top1"]:
            best = {**ev, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if ckpt is not None:
            _save_fit(ckpt, model, opt, sched, epoch, best, best_state, history, bad, device)
    model.load_state_dict(best_state)
    return {"best_epoch": best["epoch"], "history": history, "bad_samples": len(bad)}


def _train_epoch(model, opt, sched, crit, batches, device, epoch: int, epochs: int, steps: int) -> float:
    """One epoch of steps; the mean train loss.  A non-finite loss stops it before its step."""
    model.train()
    tot, n = 0.0, 0
    for i, (x, y) in enumerate(tqdm(batches, total=steps, desc=f"teacher fit {epoch + 1}/{epochs}", leave=False,
                                    disable=None)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = crit(model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteFit(f"teacher fit: the loss is {value} at epoch {epoch + 1} step {i + 1}; lower "
                               f"teacher.fit.lr or check data.mean and data.std")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot += value * len(y)
        n += len(y)
    return tot / max(1, n)


def _check_finite_weights(model, epoch: int) -> None:
    name, count = non_finite_parameter(model)
    if name is not None:
        raise NonFiniteFit(f"teacher fit: parameter {name} is non-finite after epoch {epoch + 1} ({count} "
                           f"parameters in all); lower teacher.fit.lr")


def _save_fit(ckpt: Path, model, opt, sched, epoch: int, best: dict, best_state, history: list, bad: set,
              device) -> None:
    """The fit after ``epoch``: everything the next epoch depends on, the RNG state included."""
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
             "best": best, "best_state": best_state, "history": history, "bad": sorted(bad),
             "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    atomic_torch_save(ckpt, state)


def _resume(ckpt: Path, model, opt, sched, device) -> dict | None:
    """The fit's state saved in ``ckpt``, loaded into model, optimizer, schedule and the RNG; None
    without one (or with one set aside as unreadable)."""
    def restore(state: dict) -> None:
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if {k: v.shape for k, v in state["best_state"].items()} != shapes:
            raise ValueError("its best epoch's weights do not fit the model")
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        torch.set_rng_state(state["rng"])

    state = load_checkpoint(ckpt, "the teacher fit", {"model": model, "opt": opt, "sched": sched},
                            needs=("epoch", "best", "best_state", "history", "bad", "rng"), restore=restore)
    if state is not None:
        log.info(f"teacher fit: resuming after epoch {state['epoch'] + 1} from {ckpt}")
    return state


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
        info = fit(model, cfg, train, val, device, ckpt=ctx.out / FIT_CKPT)
    model.to(device)
    val_views = ViewDataset.for_config(eval_rows(val, cfg), cfg.data, models.teacher_normalization(cfg))
    ev = evaluate(model, _images_labels(_loader(val_views, 256, False, 0), set()), device)
    model.cpu()
    atomic_torch_save(ctx.out / MODEL, {"state_dict": model.state_dict(), "model": cfg.teacher.model,
                                        "kwargs": cfg.teacher.kwargs})
    digest = models.weights_digest(model)
    (ctx.out / FIT_CKPT).unlink(missing_ok=True)  # model.pt holds the fit's result now
    log.info(f"teacher: val top-1 {ev['top1']:.2f}% top-5 {ev['top5']:.2f}% (weights {digest[:12]})")
    return {
        "val_top1": ev["top1"],
        "val_top5": ev["top5"],
        "weights_sha256": digest,
        "params": sum(p.numel() for p in model.parameters()),
        "fit_seconds": round(time.time() - t0, 1),
        DIGESTS: file_digests(ctx.out, [MODEL]),
        **info,
    }


def output_problems(runner, out: Path, lock: dict) -> list[str]:
    """What is wrong with the teacher's output ``out`` now: ``model.pt`` missing, or not the bytes
    its record's sha256 says (a truncated, edited or swapped file; a record of an older version
    holds no sha256, and its weights are checked by their digest when they are loaded)."""
    if not (out / MODEL).exists():
        return [f"{out / MODEL} is missing"]
    return digest_problems(out, lock.get("summary", {}), ())
