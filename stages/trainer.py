"""One student's training: its model, its loss from the registry, its batches, its epochs.

The student reads only what its loss needs (:func:`losses.needs`): the teacher's logits, and its
paired teacher layers as spectra or as feature maps, from the cache (the teacher is never loaded)
or, online, from the live teacher on the same views.  The loss's trainable extras are optimized
with the student and kept in its checkpoints.  Each epoch's mean loss terms, val top-1/top-5, lr
and step time are one row of ``metrics.parquet``; ``ckpt.pt`` resumes an interrupted run to the
metrics of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

import losses
from cache.reader import Cache
from pipeline import dist
from pipeline.config import PipelineConfig, ResolvedStudent
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_torch_save, atomic_write
from pipeline.schema import decisive

from . import models
from .batches import BatchMix, CachedBatches, StudentTargets
from .data import FRESH_STREAM, ViewDataset, per_class_subset
from .dynamics import SNAPSHOTS
from .pairs import check_pairs, feature_shapes, shaped_pairs, target_widths
from .repeated import RepeatedBatches, image_rows_of, repeated_batches
from .spectral import layer_sums, spectrum
from .tracking import Trackers
from .train import evaluate, load_checkpoint, optimizer, schedule
from .views import place_block, sample_views

log = logging.getLogger("pipeline")

NOT_EVALUATED = {"top1": math.nan, "top5": math.nan, "loss": math.nan}  # val numbers of an epoch not evaluated
REVISITS_WITHIN_NOISE = 25  # epochs per stored view up to which cached students matched online ones


class NonFiniteTraining(PipelineError):
    """A student's loss or weights became inf or nan: training stops, the student is recorded failed,
    the other students still train (``retryable``)."""

    retryable = True


def revisit_warning(st: ResolvedStudent, views: int) -> str | None:
    """A warning for a student that trains on cached teacher targets more than
    :data:`REVISITS_WITHIN_NOISE` epochs per stored view (README "Does the cache cost accuracy?")."""
    per_view = st.epochs / views
    reads_teacher = losses.needs(st.loss, st.pairs).reads_teacher
    if st.mode != "cached" or not reads_teacher or st.views == "fresh" or per_view <= REVISITS_WITHIN_NOISE:
        return None
    return (f"{st.name}: {st.epochs} epochs over {views} stored views is {per_view:.0f} epochs per view; in "
            f"benchmarks/offline_vs_online.py cached students lost accuracy against online ones above about "
            f"{REVISITS_WITHIN_NOISE} (2.0 points at 50, 6.8 at 200); store more views (extract.views)")


class _WithFeatures(torch.nn.Module):
    """forward(x) -> (logits, [features of the chosen layers]): one module DDP can wrap."""

    def __init__(self, model: torch.nn.Module, indices: list[int]):
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, x):
        return models.intermediates(self.model, x, self.indices)


class Trainable(torch.nn.Module):
    """The student and its loss's extras as one module for the optimizer: timm's parameter groups
    (no weight decay on biases, norms and the student's ``no_weight_decay`` tokens) over both."""

    def __init__(self, student: torch.nn.Module, loss: torch.nn.Module):
        super().__init__()
        self.student, self.loss = student, loss

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{n}" for n in names}


def teacher_normalization_differs(cfg: PipelineConfig) -> models.Normalization | None:
    """The teacher's normalization when it is not the students' (``data.mean/std``), else None."""
    t = models.teacher_normalization(cfg)
    return None if (tuple(t.mean), tuple(t.std)) == (tuple(cfg.data.mean), tuple(cfg.data.std)) else t


def write_metrics(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda f: pq.write_table(table, f))


def snapshot_row(epoch: int, layer: int, sums: dict, width: int) -> dict:
    """One snapshot record: the layer's summed statistics, as plain numbers (Parquet, checkpoints)."""
    grid = sums["grid_energy"]
    return {"epoch": epoch, "layer": layer, "positions": int(sums["positions"]),
            "spectrum_sum": [float(v) for v in sums["spectrum_sum"]], "entropy_sum": float(sums["entropy_sum"]),
            "grid_height": int(grid.shape[0]), "width": int(width), "grid_energy": [float(v) for v in grid.ravel()]}


class Trainer:
    """One student's training against the cache (or the live teacher online); ``plan`` is the
    config's resolved models (:func:`stages.models.plan_models`, resolved here when not given)."""

    def __init__(self, cfg: PipelineConfig, st: ResolvedStudent, cache: Cache, out: Path,
                 plan: models.ModelPlan | None = None, teacher=None):
        self.cfg, self.st, self.cache, self.out = cfg, st, cache, out
        self.device = models.resolve_device(st.device)
        torch.manual_seed(st.seed)
        self.model = models.create(st.model, st.kwargs, cfg.data.num_classes).to(self.device)
        self.depth = models.depth(self.model)
        self.needs = losses.needs(st.loss, st.pairs)
        pairs = (plan or models.plan_models(cfg)).pairs[st.name]
        self.pairs = pairs if self.needs.reads_layers else ()
        self.s_layers = [s for s, _ in self.pairs]
        self.t_layers = [t for _, t in self.pairs]
        self.teacher = teacher
        self.dataset = ViewDataset.for_config(cache.rows(), cfg.data)
        self._teacher_norm = teacher_normalization_differs(cfg) if teacher is not None else None
        self.views = self.view_count()
        self.train_mask = self.train_rows()
        self._fresh_keys: np.ndarray | None = None  # key hashes of the rows fresh views are drawn for
        self._image_rows: tuple[np.ndarray, np.ndarray] | None = None  # repeated augmentation's rows per image
        self.tracking = Trackers([], out, out, st.name, {}, {})  # opened by fit
        self.s_shapes = feature_shapes(self.model, self.s_layers, cfg.data.image_size)  # one probe, shared
        self.layer_pairs = self.describe_pairs()
        check_pairs(self.layer_pairs, self.needs, st.name)
        self.loss_fn = losses.build(st.loss, self.layer_pairs, cfg.data.num_classes).to(self.device)
        self.loss_fn.prepare(self.model)
        cached = st.mode == "cached"
        # on CPU a cached layer is pooled to the student's width once per read unit; on a GPU the
        # loss pools it on the device, where it costs microseconds, not the loading thread's time
        self.widths = target_widths(self.layer_pairs) if cached and self.needs.pooled and self.device.type == "cpu" \
            else {}
        self.targets = StudentTargets(cache, logits=cached and self.needs.logits,
                                      layers=tuple(sorted(set(self.t_layers))) if cached else (),
                                      form=self.needs.form or "spectra", widths=self.widths,
                                      decode_on=self.device if self.device.type == "cuda" else None)
        self.memory = {} if self.target_bytes() <= st.keep_targets_mb * 2**20 else None
        self.net: torch.nn.Module = _WithFeatures(self.model, self.s_layers)
        self.loss_net: torch.nn.Module = self.loss_fn
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
            if any(True for _ in self.loss_fn.parameters()):
                self.loss_net = torch.nn.parallel.DistributedDataParallel(self.loss_fn, device_ids=ids)

    # ------------------------------------------------------------ what the student reads
    def describe_pairs(self) -> tuple[losses.LayerPair, ...]:
        """The layer pairs with both maps' shapes (:func:`shaped_pairs`); the teacher's online come
        from a probe of the live teacher."""
        t_shapes = feature_shapes(self.teacher, self.t_layers, self.cfg.data.image_size) \
            if self.teacher is not None else None
        return shaped_pairs(self.pairs, self.s_shapes, self.cache, self.needs, self.st.name, t_shapes)

    def target_bytes(self) -> int:
        """Bytes of the teacher targets this student holds over all train views."""
        if self.st.mode != "cached" or not self.targets.any:
            return 0
        blocks = [self.cache.block("train", v) for v in range(self.views)]
        return sum(b.stop - b.start for b in blocks) * self.targets.bytes_per_row()

    def view_count(self) -> int:
        """K': how many of the cache's train views this student cycles through (1 for fresh views,
        which are drawn anew on the rows of view 0 every epoch)."""
        k = self.cache.view_count("train")
        if self.st.views == "fresh":
            return 1
        if self.st.views is not None and self.st.views > k:
            raise PipelineError(f"{self.st.name}: views {self.st.views}, but the cache {self.cache.path} holds "
                                f"{k} train views per image (extract.views)")
        return self.st.views or k

    def train_rows(self) -> np.ndarray:
        """Per cache row, whether this student may train on it: extract could read it and, with
        ``train_per_class``, its image is of the per-class subset."""
        n = self.st.train_per_class
        if n is None:
            return self.cache.valid
        rows = self.dataset.rows
        b = self.cache.block("train", 0)
        keep = per_class_subset(rows.samples, rows.sample[b.start : b.stop], n, self.cfg.seed)
        return self.cache.valid & keep[rows.sample]

    def train_block(self, epoch: int):
        return self.cache.block("train", epoch % self.views)

    def train_dataset(self, epoch: int) -> ViewDataset:
        """The views epoch ``epoch`` trains on: the cache's (replayed), or fresh ones of this epoch."""
        if self.st.views != "fresh":
            return self.dataset
        rows, b = self.dataset.rows, self.train_block(epoch)
        if self._fresh_keys is None:
            self._fresh_keys = rows.samples.key_hashes()[rows.sample[b.start : b.stop]]
        fresh = place_block(sample_views(self._fresh_keys, self.cfg.seed, FRESH_STREAM + epoch, self.dataset.policy),
                            b.start)
        return self.dataset.with_rows(rows.with_views(b.start, fresh))

    def train_batches(self, epoch: int) -> CachedBatches | RepeatedBatches:
        b = self.train_block(epoch)
        dataset = self.train_dataset(epoch)
        workers = models.resolve_workers(self.st.num_workers, self.device)
        teacher_input = dataset.normalized_as(self._teacher_norm) if self._teacher_norm is not None else None
        if self.st.repeated_aug > 1:
            return RepeatedBatches(self.targets, dataset, self.repeated_rows(epoch), num_workers=workers,
                                   memory=self.memory, teacher_input=teacher_input)
        return CachedBatches(self.targets, dataset, (b.start, b.stop), self.st.batch_size,
                             seed=self.st.seed * 100003 + epoch, shuffle=True, num_workers=workers,
                             memory=self.memory, train_mask=self.train_mask, teacher_input=teacher_input)

    def repeated_rows(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch`` under repeated augmentation (:mod:`stages.repeated`)."""
        if self._image_rows is None:
            self._image_rows = image_rows_of(self.cache, self.dataset.rows, self.views, self.train_mask)
        image_rows, keys = self._image_rows
        return repeated_batches(image_rows, keys, self.st.repeated_aug, self.st.batch_size, epoch, self.st.seed,
                                dist.rank(), dist.world_size())

    def train_labels(self, epoch: int) -> np.ndarray:
        """Labels of the rows epoch ``epoch`` trains on (its view's block, :meth:`train_rows`; with
        repeated augmentation, this rank's rows of the epoch)."""
        if self.st.repeated_aug > 1:
            return self.dataset.rows.labels(np.concatenate([np.asarray(b, dtype=np.int64)
                                                            for b in self.repeated_rows(epoch)] or [[]]))
        b = self.train_block(epoch)
        return self.dataset.rows.labels(np.arange(b.start, b.stop))[self.train_mask[b.start : b.stop]]

    def val_batches(self):
        b = self.cache.block("val", 0)
        it = CachedBatches(StudentTargets(self.cache), self.dataset, (b.start, b.stop), 256, 0, False, 0,
                           split_ranks=False)  # every rank evaluates the whole val split
        for x, y, _, _ in it:
            yield x, y

    # ------------------------------------------------------------ evaluation
    def record_due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` is evaluated, logged and checkpointed (``eval_every``, the last
        epoch, snapshot epochs)."""
        return (epoch + 1) % self.st.eval_every == 0 or epoch + 1 == self.st.epochs or self.snapshot_due(epoch)

    def snapshot_due(self, epoch: int) -> bool:
        n = self.st.snapshot_every
        return n > 0 and ((epoch + 1) % n == 0 or epoch + 1 == self.st.epochs)

    def evaluate(self, epoch: int) -> tuple[dict, list[dict]]:
        """Val top-1/top-5/loss; at snapshot epochs, from the same forward pass, the analysis sums of
        every student layer on the val split (:func:`stages.spectral.layer_sums`): the statistics
        are kept rather than the weights, a few numbers per layer instead of a checkpoint."""
        amp = lambda: models.autocast(self.device, self.st.amp)  # noqa: E731
        if not self.snapshot_due(epoch):
            return evaluate(self.model, self.val_batches(), self.device, amp), []
        sums: list[dict | None] = [None] * self.depth
        widths = [0] * self.depth

        def add(feats):
            for i, f in enumerate(feats):
                s = layer_sums(f)
                sums[i] = s if sums[i] is None else {k: sums[i][k] + s[k] for k in s}
                widths[i] = f.shape[-1]

        ev = evaluate(self.model, self.val_batches(), self.device, amp, list(range(self.depth)), add)
        return ev, [snapshot_row(epoch, layer, s, widths[layer]) for layer, s in enumerate(sums) if s is not None]

    # ------------------------------------------------------------ steps
    def targets_online(self, x: torch.Tensor) -> dict:
        """The live teacher's targets for its input ``x`` (the batch normalized as the teacher's), in
        the form the loss reads."""
        layers = sorted(set(self.t_layers))
        with torch.no_grad(), models.autocast(self.device, self.st.amp):
            logits, feats = models.intermediates(self.teacher, x, layers)
        out = {"logits": logits.float()}
        for t, f in zip(layers, feats):
            out[t] = spectrum(f) if self.needs.form == "spectra" else f.float()
        return out

    def loss(self, x, y, targets: dict, epoch: int = 0) -> dict[str, torch.Tensor]:
        """``{"total": ..., <term>: ...}`` of the student's loss on one batch."""
        with models.autocast(self.device, self.st.amp):
            out, feats = self.net(x)
        heads = out if isinstance(out, tuple) else (out, None)  # a distillation token's second head
        student = losses.StudentOutputs(heads[0].float(), [f.float() for f in feats],
                                        None if heads[1] is None else heads[1].float())
        teacher = losses.TeacherTargets(targets.get("logits"), [targets[t] for t in self.t_layers])
        return self.loss_net(student, teacher, y, epoch)

    def step(self, x, y, targets: dict, opt: torch.optim.Optimizer, epoch: int = 0) -> dict[str, float]:
        """One optimizer step on a loader batch (targets from the cache, or the live teacher online);
        returns the loss terms as numbers."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        targets = {k: v.to(self.device, non_blocking=True) for k, v in targets.items()}
        if self.st.mode == "online" and self.needs.reads_teacher:
            # the teacher's own input when its normalization differs: the same pixels, erased and
            # mixed as extract does it (CachedBatches' teacher_input)
            targets = self.targets_online(targets.pop("teacher_x", x))
        terms = self.loss(x, y, targets, epoch)
        values = {k: float(v.detach()) for k, v in terms.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:  # stop before the step: the weights stay those of the last finite step
            term = next((k for k in values if k != "total" and k in bad), "total")  # the term that went first
            raise NonFiniteTraining(f"{self.st.name}: the {term} loss is {values[term]} "
                                    f"({', '.join(f'{k} {v:.4g}' for k, v in values.items())})")
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        return values

    def check_finite_weights(self, epoch: int) -> None:
        params = [*self.model.named_parameters(), *(("loss." + n, p) for n, p in self.loss_fn.named_parameters())]
        bad = [n for n, p in params if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteTraining(f"{self.st.name}: parameter {bad[0]} is non-finite after epoch {epoch + 1} "
                                    f"({len(bad)} parameters in all)")

    # ------------------------------------------------------------ epochs
    def checkpoint_parts(self, opt, sched) -> dict:
        """What ``ckpt.pt`` holds and a resume restores: the student, the loss's extras (when it has
        any), the optimizer and the schedule."""
        parts = {"model": self.model, "opt": opt, "sched": sched}
        if self.loss_fn.state_dict():
            parts["loss"] = self.loss_fn
        return parts

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train every remaining epoch (resuming from ``ckpt.pt``); one metrics row per epoch, and the
        snapshots of :meth:`evaluate` in ``snapshots.parquet``."""
        st, out = self.st, self.out
        opt = optimizer(Trainable(self.model, self.loss_fn), st.optimizer, st.lr, st.weight_decay)
        steps_per_epoch = len(self.train_batches(0))
        sched = schedule(opt, st.epochs * steps_per_epoch, int(st.warmup_epochs * steps_per_epoch), st.lr,
                         st.warmup_lr, st.min_lr)
        parts = self.checkpoint_parts(opt, sched)
        start, metrics, snapshots = self._resume(out / "ckpt.pt", parts)
        self.tracking = self.open_trackers()
        try:
            for epoch in range(start, st.epochs):
                self._fit_epoch(epoch, start, metrics, snapshots, parts, max_steps)
        finally:
            self.tracking.close()
        if start >= st.epochs and dist.is_main():  # resumed after the last epoch: the records come back whole
            write_metrics(out / "metrics.parquet", metrics)
            if snapshots:
                write_metrics(out / SNAPSHOTS, snapshots)
        return metrics

    def open_trackers(self) -> Trackers:
        """The student's experiment trackers (``track``; on the main rank only), with its resolved
        config and the cache's fingerprint as parameters and its seed group and sweep as tags."""
        from .groups import student_groups

        st = self.st
        if not dist.is_main() or not st.track:
            return Trackers([], self.out, self.out, st.name, {}, {})
        group = next((g for g in student_groups(self.cfg) if st.name in g.members.values()), None)
        sweep = self.cfg.distill.sweep_runs().get(st.name)
        tags = {"group": group.label if group else st.name, "seed": st.seed, "kind": st.loss.kind, "mode": st.mode}
        if sweep is not None:
            tags["sweep"] = self.cfg.distill.sweep[sweep[0]].base["name"]
        params = {"student": decisive(st), "cache_fingerprint": self.cache.attrs.get("fingerprint")}
        return Trackers(st.track, self.out, Path(self.cfg.workdir), st.name, params, tags)

    def _fit_epoch(self, epoch: int, start: int, metrics: list[dict], snapshots: list[dict], parts: dict,
                   max_steps: int | None) -> None:
        st, out = self.st, self.out
        sched = parts["sched"]
        t0 = time.time()
        terms, step_s, mix = self._train_epoch(epoch, parts["opt"], sched, max_steps)
        due = self.record_due(epoch)
        ev, snap = self.evaluate(epoch) if due else (NOT_EVALUATED, [])
        row = {
            "student": st.name, "epoch": epoch, "lr": float(sched.get_last_lr()[0]), **terms,
            "val_top1": ev["top1"], "val_top5": ev["top5"], "val_loss": ev["loss"],
            "epoch_s": time.time() - t0, "step_s": step_s, **mix.summary(),
        }
        metrics.append(row)
        snapshots += snap
        if dist.is_main() and epoch == start:
            mix.check(st.name)
        if dist.is_main() and due:
            parts_text = " ".join(f"{k.removeprefix('loss_')} {v:.4g}" for k, v in terms.items() if k != "loss_total")
            log.info(f"{st.name} epoch {epoch + 1}/{st.epochs}: loss {row['loss_total']:.4f} ({parts_text}) "
                     f"val top-1 {ev['top1']:.2f}% ({row['epoch_s']:.1f}s)")
            atomic_torch_save(out / "ckpt.pt", {**{k: p.state_dict() for k, p in parts.items()}, "epoch": epoch,
                                                "metrics": metrics, "snapshots": snapshots})
            write_metrics(out / "metrics.parquet", metrics)
            if snapshots:
                write_metrics(out / SNAPSHOTS, snapshots)
        self.tracking.epoch(epoch, row)
        dist.barrier()

    def _resume(self, ck: Path, parts: dict) -> tuple[int, list[dict], list[dict]]:
        """(first epoch to train, metrics so far, snapshots so far), from ``ck`` when it exists; an
        unreadable ``ck`` is set aside and the student trains from scratch (:func:`train.load_checkpoint`)."""
        state = load_checkpoint(ck, f"student {self.st.name}", parts, needs=("epoch", "metrics"))
        if state is None:
            return 0, [], []
        if dist.is_main():
            log.info(f"{self.st.name}: resuming after epoch {state['epoch'] + 1} from {ck}")
        return state["epoch"] + 1, state["metrics"], state.get("snapshots", [])

    def _train_epoch(self, epoch: int, opt, sched, max_steps: int | None) -> tuple[dict, float, BatchMix]:
        """One epoch of steps: (mean loss terms over all ranks, mean step seconds, the batch mix)."""
        st = self.st
        torch.manual_seed(st.seed * 1000 + epoch)
        self.model.train()
        self.loss_fn.train()
        sums: dict[str, float] = {}
        rows = 0
        step_times = []
        batches = self.train_batches(epoch)
        mix = BatchMix(self.train_labels(epoch), st.batch_size)
        bar = tqdm(batches, total=len(batches), desc=f"{st.name} {epoch + 1}/{st.epochs}", leave=False,
                   disable=not dist.is_main() or None)
        for i, (x, y, row_ids, targets) in enumerate(bar):
            mix.add(y)
            y = batches.dataset.label_targets(y, row_ids, self.cfg.data.num_classes)  # mixed labels with mixing
            ts = time.perf_counter()
            try:
                values = self.step(x, y, targets, opt, epoch)
            except NonFiniteTraining as e:
                raise NonFiniteTraining(f"{e} at epoch {epoch + 1} step {i + 1}; lower the lr or check the "
                                        f"loss weights") from None
            sched.step()
            if self.st.track_steps:
                self.tracking.step(epoch * len(batches) + i, {**{f"loss_{k}": v for k, v in values.items()},
                                                              "lr": sched.get_last_lr()[0]})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            rows += len(y)
            step_times.append(time.perf_counter() - ts)
            if max_steps is not None and i + 1 >= max_steps:
                break
        self.check_finite_weights(epoch)
        names = list(sums)
        tot = dist.all_reduce_sum([sums[k] for k in names] + [float(rows)])
        n = max(1.0, tot[-1])
        terms = {f"loss_{k}": tot[i] / n for i, k in enumerate(names)}
        return terms, float(np.mean(step_times)) if step_times else 0.0, mix
