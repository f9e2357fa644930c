"""distill: students trained against the cached teacher, one graph node each, and their summary.

Each student is the node ``distill/<name>`` (:func:`run_student`, built by the runner under the
student's own lock): it trains with its loss from the registry (``losses/``) through
:class:`stages.trainer.Trainer`.  Cached mode never loads the teacher: each train row's exact view
is rebuilt from the source shard and the view parameters the manifest stores
(:func:`stages.views.view_array`, as extract built it), and the teacher's logits and only the
layers the loss needs are read from the cache.  Online mode runs the teacher live on the same
views.  Epoch ``e`` trains on view ``e mod K'`` of every image, read in chunk-aligned units
(:mod:`stages.batches`).

The ``distill`` node (:func:`run`) is the summary over every student, with seed groups and paired
differences (:func:`stages.groups.summary_table`).  Each student's folder holds ``ckpt.pt`` (a
rerun resumes from it), ``final.pt``, ``metrics.parquet`` (one row per epoch, each loss term in its
own column) and ``lock.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import losses
from cache.reader import Cache, open_cache
from cache.verify import DIGESTS, digest_problems, file_digests
from pipeline import dist
from pipeline.config import PipelineConfig, ResolvedStudent
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_torch_save, atomic_write, atomic_write_text
from pipeline.nodes import student_name

from . import models
from .dynamics import SNAPSHOTS
from .groups import summary_table
from .trainer import Trainer, revisit_warning

log = logging.getLogger("pipeline")


def run_student(ctx) -> dict:
    """Build node ``distill/<name>``: train one student into ``ctx.out`` (the runner holds its lock,
    prepares the folder, records it, and records a failure in ``failed.json``).  A rerun resumes
    from ``ckpt.pt``."""
    cfg: PipelineConfig = ctx.cfg
    name = student_name(ctx.stage)
    st = cfg.student(name)
    cache = open_cache(ctx.upstream["extract"])
    check_cache_teacher(cache, ctx.upstream["teacher"])
    teacher = None
    if st.mode == "online" and losses.needs(st.loss, st.pairs).reads_teacher:
        teacher = models.load_teacher(ctx.upstream["teacher"], cfg).to(models.resolve_device(st.device))
    return _train_into(ctx.runner, cfg, name, cache, teacher, ctx.options.get("max_steps"), ctx.out)


def _train_into(runner, cfg: PipelineConfig, name: str, cache: Cache, teacher,
                max_steps: int | None, out: Path) -> dict:
    st = cfg.student(name)
    t0 = time.time()
    tr = Trainer(cfg, st, cache, out, runner.model_plan, teacher=teacher)
    if dist.is_main():
        ddp = f", DDP over {dist.world_size()} processes" if dist.world_size() > 1 else ""
        views = "fresh views every epoch" if st.views == "fresh" else f"{tr.views} cached views per image"
        log.info(f"{name}: {st.loss.kind} student {st.model}, {st.mode} teacher targets, {views}, "
                 f"{len(tr.train_labels(0))} train rows per epoch, {tr.device}{ddp}")
    if dist.is_main() and (warning := revisit_warning(st, tr.views)):
        log.warning(warning)
    metrics = tr.fit(max_steps=max_steps)
    last = metrics[-1]
    summary = {
        "student": name, "model": st.model, "kind": st.loss.kind, "mode": st.mode, "seed": st.seed,
        "val_top1": last["val_top1"], "val_top5": last["val_top5"],
        "best_val_top1": float(np.nanmax([m["val_top1"] for m in metrics])), "epochs": st.epochs,
        "views": "fresh" if st.views == "fresh" else tr.views, "train_per_class": st.train_per_class,
        "train_rows": int(len(tr.train_labels(0))),
        "params": sum(p.numel() for p in tr.model.parameters()),
        "loss_params": sum(p.numel() for p in tr.loss_fn.parameters()), "train_s": round(time.time() - t0, 1),
        "step_s": float(np.mean([m["step_s"] for m in metrics])),
    }
    if dist.is_main():
        final = {"state_dict": tr.model.state_dict(), "model": st.model, "kwargs": st.kwargs}
        if tr.loss_fn.state_dict():
            final["loss_state_dict"] = tr.loss_fn.state_dict()  # the loss's extras, e.g. a FitNets regressor
        atomic_torch_save(out / "final.pt", final)
        summary[DIGESTS] = file_digests(out, student_files(st))
    dist.barrier()
    return summary


def student_files(st: ResolvedStudent) -> list[str]:
    """The files a finished student's folder holds and its record keeps the sha256 of: the weights,
    the metrics and, when it keeps snapshots (``snapshot_every`` > 0: the last epoch always is one),
    ``snapshots.parquet``."""
    return ["final.pt", "metrics.parquet", *([SNAPSHOTS] if st.snapshot_every > 0 else [])]


def output_problems(runner, out: Path, lock: dict) -> list[str]:
    """What is wrong with student output ``out`` now: each of its files (:func:`student_files`)
    missing or not the bytes its record's sha256 says (a swapped, edited or truncated ``final.pt``)."""
    st = runner.cfg.student(student_name(lock.get("stage", "")) or "")
    return digest_problems(out, lock.get("summary", {}), student_files(st))


def check_cache_teacher(cache: Cache, teacher_rec) -> None:
    want = teacher_rec.summary.get("weights_sha256")
    got = cache.attrs.get("teacher", {}).get("weights_sha256")
    if want and got != want:
        raise PipelineError(
            f"{cache.path}: cache was made by teacher weights {str(got)[:12]}, but the teacher is now "
            f"{want[:12]}; refusing it (rerun extract)"
        )


def run(ctx) -> dict:
    """Build the ``distill`` node: the summary over every student (each already built as its own
    node ``distill/<name>``), with seed groups and paired differences (:mod:`stages.groups`)."""
    cfg: PipelineConfig = ctx.cfg
    if not cfg.distill.students:
        log.warning("distill: no students configured (distill.students is empty)")
    results = []
    for s in cfg.distill.students:
        rec = ctx.runner.student_record(s.name)
        if rec is None:
            raise PipelineError(f"distill: student {s.name} has no complete output; run distill")
        results.append(rec.summary)
    summary = {"students": {r["student"]: {k: r[k] for k in ("val_top1", "val_top5", "kind", "mode")}
                            for r in results}}
    if dist.is_main():
        table, md = summary_table(ctx.upstream["teacher"].summary, cfg, results)
        atomic_write(ctx.out / "summary.parquet", lambda f: pq.write_table(table, f))
        atomic_write_text(ctx.out / "summary.md", md)
        print("\n" + md)
    return summary
