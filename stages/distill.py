"""distill: train a student against the cached teacher with the SpectralKD loss, and summarize them.

Each student is the graph node ``distill/<name>`` (:func:`run_student`, one per student, built by
the runner under the student's own lock); the ``distill`` node (:func:`run`) is the summary over
every student, with seed groups and paired differences (:mod:`stages.groups`).

Cached mode never loads the teacher: each train row's exact view is rebuilt from the source shard
and the view parameters stored in the manifest (:func:`stages.views.view_array`, as extract built
it), and the teacher's logits and only the spectra the student needs are read from the cache.

View order: epoch ``e`` trains on view ``e mod K`` of every sample (K = extract.views).  The rows
of one view are a contiguous block of the cache, so an epoch reads it in chunk-aligned units
(shuffled unit order, rows shuffled inside a small pool of units): no tiny random reads.

Online mode runs the teacher live on the same views, for A/B checks and for users without disk.
Each student's output folder holds ``ckpt.pt`` (every epoch; a rerun resumes from it),
``final.pt``, ``metrics.parquet`` (one row per epoch, each loss term separately) and ``lock.json``.
"""

from __future__ import annotations

import logging
import math
import concurrent.futures
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from cache.reader import Cache, open_cache
from cache.verify import DIGESTS, digest_problems, file_digests
from pipeline import dist
from pipeline.config import PipelineConfig, ResolvedStudent, decisive, has_spectral_term, needs_teacher_logits
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text
from pipeline.graph import FAILED, student_name, student_node

from . import models
from .data import FRESH_STREAM, ViewDataset, per_class_subset, view_loader
from .repeated import RepeatedBatches, image_rows_of, repeated_batches
from .tracking import Trackers
from .views import place_block, sample_views
from .dynamics import SNAPSHOTS
from .spectral import check_pair, layer_sums, pool_channels, spectralkd_loss, spectrum
from .train import evaluate, optimizer, schedule

log = logging.getLogger("pipeline")

NOT_EVALUATED = {"top1": math.nan, "top5": math.nan, "loss": math.nan}  # val numbers of an epoch not evaluated


class NonFiniteTraining(PipelineError):
    """A student's loss or weights became inf or nan: training stops, the student is recorded failed,
    the other students still train (``retryable``)."""

    retryable = True


# ----------------------------------------------------------------------------- data


def units_of(start: int, stop: int, unit: int) -> list[tuple[int, int]]:
    """Split [start, stop) at multiples of ``unit`` (chunk-aligned read ranges)."""
    out = []
    a = start
    while a < stop:
        b = min(stop, (a // unit + 1) * unit)
        out.append((a, b))
        a = b
    return out


class CachedBatches:
    """Batches of (x, y, row ids, teacher targets) over a block of cache rows.

    targets: {"logits": (B, K) float16, <teacher layer index>: (B, C, H, W//2+1, 2)}, the spectra
    dense whatever the cache's encoding (:meth:`cache.reader.Cache.read_layer`): float16 at the
    stored width, or float32 pooled to ``widths[layer]`` channels once per read unit (what the loss
    would pool them to every step); with ``teacher_input`` also "teacher_x", the batch normalized
    for an online teacher.
    Images come from DataLoader workers; cache reads run in a prefetch thread of this process.
    """

    def __init__(
        self,
        cache: Cache,
        dataset: ViewDataset,
        rows: tuple[int, int],
        batch_size: int,
        layers: list[int],
        want_logits: bool,
        seed: int,
        shuffle: bool,
        num_workers: int = 0,
        pool_units: int = 2,
        split_ranks: bool = True,
        memory: dict | None = None,
        rows_used: np.ndarray | None = None,
        teacher_input: ViewDataset | None = None,
        widths: dict[int, int] | None = None,
    ):
        self.cache, self.dataset = cache, dataset
        self.widths = widths or {}
        # an online teacher normalized otherwise than the student gets its own input, "teacher_x"
        self.teacher_input = teacher_input
        self.unit = cache.chunk_rows()
        self.units = units_of(rows[0], rows[1], self.unit)
        self.batch_size, self.layers, self.want_logits = batch_size, layers, want_logits
        self.seed, self.shuffle, self.num_workers, self.pool_units = seed, shuffle, num_workers, pool_units
        self.split_ranks = split_ranks and dist.world_size() > 1
        # the rows trained on: those extract could read (``rows_used``: a subset of them)
        self.valid = cache.valid if rows_used is None else rows_used
        self.memory = memory  # unit -> decoded targets, kept across epochs when given

    def order(self) -> list[int]:
        """This process's units in epoch order; under DDP each rank takes an equal share."""
        idx = np.arange(len(self.units))
        if self.shuffle:
            idx = np.random.default_rng([self.seed, 1]).permutation(idx)
        w = dist.world_size()
        if self.split_ranks:
            idx = idx[: len(idx) // w * w][dist.rank() :: w]
        return idx.tolist()

    def _rank_steps(self, order: list[int]) -> int | None:
        """Under DDP, the batch count every rank reaches (ranks must take the same number of steps)."""
        if not self.split_ranks:
            return None
        rows = sum(int(self.valid[a:b].sum()) for a, b in (self.units[u] for u in order))
        return int(dist.all_reduce_min(rows // self.batch_size))

    def _read_targets(self, u: int) -> tuple[bool, dict]:
        """Unit ``u``'s targets as (already held, arrays): from memory, or read from the cache with
        numpy only (this runs in the reader thread, where a torch op would start a second team of
        intra-op threads competing with the training step's)."""
        a, b = self.units[u]
        if self.memory is not None and (a, b) in self.memory:
            return True, self.memory[(a, b)]
        out = {}
        if self.want_logits:
            out["logits"] = self.cache.read("logits", a, b)
        for t in self.layers:
            out[t] = self.cache.read_layer("spectra", t, a, b)
        return False, out

    def _targets(self, u: int, read: tuple[bool, dict]) -> dict:
        """Unit ``u``'s targets as tensors, spectra pooled to ``widths`` (once per unit, in the
        training thread), kept in memory when a budget is given."""
        held, arrays = read
        if held:
            return arrays
        out = {}
        for k, v in arrays.items():
            t = torch.from_numpy(v)
            w = self.widths.get(k)  # teacher layers only; None: kept as stored
            out[k] = pool_channels(t.float(), w) if w is not None and w != t.shape[1] else t
        if self.memory is not None:
            self.memory[self.units[u]] = out
        return out

    def unit_rows(self, u: int) -> np.ndarray:
        """The rows of unit ``u`` that are trained on (read from the source; targets read whole)."""
        a, b = self.units[u]
        return a + np.flatnonzero(self.valid[a:b])

    def __len__(self) -> int:
        n = sum(int(self.valid[a:b].sum()) for a, b in self.units)
        if self.split_ranks:
            n //= dist.world_size()
        return max(1, -(-n // self.batch_size))

    def __iter__(self):
        order = self.order()
        loader = iter(view_loader(self.dataset, [self.unit_rows(u).tolist() for u in order], self.num_workers))
        reads = _TargetReads(self._read_targets if self.want_logits or self.layers else (lambda u: (True, {})),
                             order, ahead=2)
        rng = np.random.default_rng([self.seed, 2])
        pool: list[dict] = []
        limit = self._rank_steps(order)
        yielded = 0
        try:
            for i, u in enumerate(order):
                reads.start(i)
                x, y, ok, _ = next(loader)
                targets = self._targets(u, reads.result(i))
                a, b = self.units[u]
                rows = self.unit_rows(u)
                self.dataset.require_readable(rows, ok.numpy(), np.ones(len(rows), dtype=bool))
                keep = self.valid[a:b]
                if not keep.all():  # targets are read for the whole unit; images only for kept rows
                    sel = torch.from_numpy(keep)
                    targets = {k: v[sel] for k, v in targets.items()}
                part = {"x": x, "y": y, "rows": torch.from_numpy(rows), **targets}
                pool.append(part)
                if len(pool) >= self.pool_units:
                    for batch in self._drain(pool, rng, final=False):
                        if yielded == limit:
                            return
                        yielded += 1
                        yield batch
            for batch in self._drain(pool, rng, final=True):
                if yielded == limit:
                    return
                yielded += 1
                yield batch
        finally:
            reads.close()

    def _drain(self, pool: list[dict], rng, final: bool):
        if not pool:
            return
        merged = {k: torch.cat([p[k] for p in pool]) for k in pool[0]}
        n = len(merged["rows"])
        perm = torch.from_numpy(rng.permutation(n)) if self.shuffle else torch.arange(n)
        bs = self.batch_size
        full = n // bs * bs if not final else n
        for i in range(0, full, bs):
            sel = perm[i : i + bs]
            batch = {k: v.index_select(0, sel) for k, v in merged.items()}
            x = self.dataset.normalize(batch["x"], batch["rows"])
            extras = {k: v for k, v in batch.items() if k not in ("x", "y", "rows")}
            if self.teacher_input is not None:
                extras["teacher_x"] = self.teacher_input.normalize(batch["x"], batch["rows"])
            yield x, batch["y"], batch["rows"], extras
        rest = perm[full:]
        pool.clear()
        if len(rest):
            pool.append({k: v[rest] for k, v in merged.items()})


class _TargetReads:
    """``read(unit)`` of the units in ``order``, run by one background thread: :meth:`start` (i)
    asks for unit i and up to ``ahead`` more, :meth:`result` (i) waits for unit i and returns what
    ``read`` returned (its error, if any, is raised here)."""

    def __init__(self, read, order: list[int], ahead: int):
        self.read, self.order, self.ahead = read, order, ahead
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-reader")
        self.pending: dict[int, concurrent.futures.Future] = {}

    def start(self, i: int) -> None:
        for j in range(i, min(len(self.order), i + 1 + self.ahead)):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(self.read, self.order[j])

    def result(self, i: int):
        self.start(i)
        return self.pending.pop(i).result()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)


def expected_distinct_labels(counts: np.ndarray, batch: int) -> float:
    """Mean number of distinct labels in a batch of ``batch`` rows drawn uniformly without
    replacement from rows with these per-class ``counts``: sum_c 1 - C(N - n_c, B) / C(N, B)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    b = min(batch, int(n))
    if b <= 0:
        return 0.0

    def log_choose(a, k):
        return math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)

    miss = [math.exp(log_choose(n - c, b) - log_choose(n, b)) if n - c >= b else 0.0 for c in counts if c > 0]
    return float(sum(1.0 - m for m in miss))


class BatchMix:
    """How well an epoch's batches mix the classes: the mean number of distinct labels per batch,
    against what a uniform shuffle of the same rows would give (:func:`expected_distinct_labels`).
    Batches far below it (class-sorted rows) train a student on one or two classes at a time."""

    WARN_BELOW = 0.75

    def __init__(self, labels: np.ndarray, batch_size: int):
        self.uniform = expected_distinct_labels(np.bincount(labels), batch_size) if len(labels) else 0.0
        self.batch_size = batch_size
        self.distinct: list[int] = []

    def add(self, y: torch.Tensor) -> None:
        if len(y) == self.batch_size:  # a short last batch is not comparable
            self.distinct.append(int(torch.unique(y).numel()))

    def summary(self) -> dict:
        return {"batch_labels": float(np.mean(self.distinct)) if self.distinct else float("nan"),
                "batch_labels_uniform": self.uniform}

    def check(self, name: str) -> None:
        got = self.summary()["batch_labels"]
        msg = (f"{name}: batches hold {got:.2f} distinct labels on average, a uniform shuffle of these rows "
               f"{self.uniform:.2f}")
        if self.distinct and got < self.WARN_BELOW * self.uniform:
            log.warning(f"{msg}: the rows are not mixed (class-sorted input?); students trained so collapse. "
                        f"Re-extract with this version (rows are laid out in a seeded permutation)")
        else:
            log.info(msg)


# ----------------------------------------------------------------------------- training


def student_dir(runner, name: str) -> Path:
    return runner.student_dir(name)


REVISITS_WITHIN_NOISE = 25  # epochs per stored view up to which cached students matched online ones


def revisit_warning(st: ResolvedStudent, views: int) -> str | None:
    """A warning for a student that trains on cached teacher targets more than
    :data:`REVISITS_WITHIN_NOISE` epochs per stored view (README "Does the cache cost accuracy?")."""
    per_view = st.epochs / views
    if st.mode != "cached" or st.loss.kind == "none" or st.views == "fresh" or per_view <= REVISITS_WITHIN_NOISE:
        return None
    return (f"{st.name}: {st.epochs} epochs over {views} stored views is {per_view:.0f} epochs per view; in "
            f"benchmarks/offline_vs_online.py cached students lost accuracy against online ones above about "
            f"{REVISITS_WITHIN_NOISE} (2.0 points at 50, 6.8 at 200); store more views (extract.views)")


def check_student(cache: Cache | None, shapes: list[tuple[int, ...]], st: ResolvedStudent,
                  pairs: tuple[tuple[int, int], ...]) -> None:
    """Fail before training when a layer pair (normalized, :class:`stages.models.ModelPlan`) cannot
    be matched against the cached teacher layer (:func:`stages.spectral.check_pair`); ``shapes``
    are the student's feature shapes at the pairs' layers (:func:`feature_shapes`)."""
    if not has_spectral_term(st.loss.kind, pairs) or cache is None:
        return
    for (sl, tl), shape in zip(pairs, shapes):
        where = f"{st.name} [{sl}, {tl}]"
        cache.require_width(tl, shape[1], f"layer pair {where}")
        check_pair(shape, (1, *cache.layer(tl).spectrum_shape()), where)


def feature_shapes(model, layers: list[int], size: int) -> list[tuple[int, ...]]:
    """The NCHW shapes of ``model``'s features at ``layers`` for one image (an eval-mode probe; the
    model's training flag is restored)."""
    if not layers:
        return []
    training = model.training
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        _, feats = models.intermediates(model.eval(), x, layers)
    model.train(training)
    return [tuple(int(d) for d in f.shape) for f in feats]


def target_widths(pairs: tuple[tuple[int, int], ...], shapes: list[tuple[int, ...]]) -> dict[int, int]:
    """Teacher layer -> the student width its cached spectrum is pooled to once at read time
    (layers paired with students of several widths are left at the stored width)."""
    widths: dict[int, set[int]] = {}
    for (_, t), shape in zip(pairs, shapes):
        widths.setdefault(t, set()).add(shape[1])
    return {t: w.pop() for t, w in widths.items() if len(w) == 1}


class _WithFeatures(torch.nn.Module):
    """forward(x) -> (logits, [features of the chosen layers]): one module DDP can wrap."""

    def __init__(self, model: torch.nn.Module, indices: list[int]):
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, x):
        return models.intermediates(self.model, x, self.indices)


def teacher_normalization_differs(cfg: PipelineConfig) -> models.Normalization | None:
    """The teacher's normalization when it is not the students' (``data.mean/std``), else None."""
    t = models.teacher_normalization(cfg)
    return None if (tuple(t.mean), tuple(t.std)) == (tuple(cfg.data.mean), tuple(cfg.data.std)) else t


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
        pairs = (plan or models.plan_models(cfg)).pairs[st.name]
        self.pairs = pairs if has_spectral_term(st.loss.kind, pairs) else ()
        self.s_layers = [s for s, _ in self.pairs]
        self.t_layers = [t for _, t in self.pairs]
        self.teacher = teacher
        self.dataset = ViewDataset.for_config(cache.rows(), cfg.data)
        self._teacher_norm = teacher_normalization_differs(cfg) if teacher is not None else None
        self.views = self.view_count()
        self.rows_used = self.train_rows()
        self._fresh_keys: np.ndarray | None = None  # key hashes of the rows fresh views are drawn for
        self._image_rows: tuple[np.ndarray, np.ndarray] | None = None  # repeated augmentation's rows per image
        self.tracking = Trackers([], out, out, st.name, {}, {})  # opened by fit
        self.net: torch.nn.Module = _WithFeatures(self.model, self.s_layers)
        self.s_shapes = feature_shapes(self.model, self.s_layers, cfg.data.image_size)  # one probe, shared
        # on CPU the cached spectra are pooled to the student's width once per read unit; on a GPU
        # the loss pools them on the device, where it costs microseconds, not the loading thread's time
        self.widths = target_widths(self.pairs, self.s_shapes) if st.mode == "cached" and self.device.type == "cpu" \
            else {}
        self.memory = {} if self.target_bytes() <= st.keep_targets_mb * 2**20 else None
        if dist.world_size() > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def target_bytes(self) -> int:
        """Bytes of the decoded teacher targets this student reads over all train views."""
        if self.st.mode != "cached" or self.st.loss.kind == "none":
            return 0
        blocks = [self.cache.block("train", v) for v in range(self.views)]
        rows = sum(b.stop - b.start for b in blocks)
        return rows * self.cache.target_bytes_per_row(self.t_layers, self.widths)

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
        """The rows this student may train on: those extract could read and, with
        ``train_per_class``, of a per-class subset of the images."""
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
        cached = self.st.mode == "cached"
        views = self.train_dataset(epoch)
        if self.st.repeated_aug > 1:
            return RepeatedBatches(self.cache, views, self.repeated_rows(epoch),
                                   layers=sorted(set(self.t_layers)) if cached else [],
                                   want_logits=cached and needs_teacher_logits(self.st.loss.kind),
                                   num_workers=models.resolve_workers(self.st.num_workers, self.device),
                                   memory=self.memory, widths=self.widths,
                                   teacher_input=views.normalized_as(self._teacher_norm)
                                   if self._teacher_norm is not None else None)
        return CachedBatches(
            self.cache, views, (b.start, b.stop), self.st.batch_size,
            layers=sorted(set(self.t_layers)) if cached else [], widths=self.widths,
            want_logits=cached and needs_teacher_logits(self.st.loss.kind),
            seed=self.st.seed * 100003 + epoch, shuffle=True,
            num_workers=models.resolve_workers(self.st.num_workers, self.device), memory=self.memory,
            rows_used=self.rows_used,
            teacher_input=views.normalized_as(self._teacher_norm) if self._teacher_norm is not None else None,
        )

    def repeated_rows(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch`` under repeated augmentation (:mod:`stages.repeated`)."""
        if self._image_rows is None:
            self._image_rows = image_rows_of(self.cache, self.dataset.rows, self.views, self.rows_used)
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
        return self.dataset.rows.labels(np.arange(b.start, b.stop))[self.rows_used[b.start : b.stop]]

    def val_batches(self):
        b = self.cache.block("val", 0)
        it = CachedBatches(self.cache, self.dataset, (b.start, b.stop), 256, [], False, 0, False, 0,
                           split_ranks=False)  # every rank evaluates the whole val split
        for x, y, _, _ in it:
            yield x, y

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

    def targets_online(self, x: torch.Tensor) -> dict:
        """The live teacher's targets for its input ``x`` (the batch normalized as the teacher's)."""
        with torch.no_grad(), models.autocast(self.device, self.st.amp):
            logits, feats = models.intermediates(self.teacher, x, sorted(set(self.t_layers)))
        out = {"logits": logits.float()}
        for t, f in zip(sorted(set(self.t_layers)), feats):
            out[t] = spectrum(f)
        return out

    def loss(self, x, y, targets):
        st = self.st
        with models.autocast(self.device, st.amp):
            logits, feats = self.net(x)
        spectral = bool(self.pairs)
        return spectralkd_loss(
            logits.float(), y,
            teacher_logits=targets.get("logits"),
            student_feats=[f.float() for f in feats] if spectral else None,
            teacher_specs=[targets[t] for t in self.t_layers] if spectral else None,
            kind=st.loss.kind, alpha=st.loss.alpha, tau=st.loss.tau, beta=st.loss.beta,
            w_fft=st.loss.w_fft, label_smoothing=st.loss.label_smoothing,
        )

    def step(self, x, y, targets: dict, opt: torch.optim.Optimizer):
        """One optimizer step on a loader batch (targets from the cache, or the live teacher online)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        targets = {k: v.to(self.device, non_blocking=True) for k, v in targets.items()}
        if self.st.mode == "online" and self.st.loss.kind != "none":
            # the teacher's own input when its normalization differs: the same pixels, erased and
            # mixed as extract does it (CachedBatches' teacher_input)
            targets = self.targets_online(targets.pop("teacher_x", x))
        terms = self.loss(x, y, targets)
        values = terms.items()
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:  # stop before the step: the weights stay those of the last finite step
            term = next((k for k in ("ce", "kd", "spec") if k in bad), "total")  # the term that went first
            raise NonFiniteTraining(f"{self.st.name}: the {term} loss is {values[term]} "
                                    f"({', '.join(f'{k} {v:.4g}' for k, v in values.items())})")
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        return terms

    def check_finite_weights(self, epoch: int) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteTraining(f"{self.st.name}: parameter {bad[0]} is non-finite after epoch {epoch + 1} "
                                    f"({len(bad)} parameters in all)")

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train every remaining epoch (resuming from ``ckpt.pt``); one metrics row per epoch, and the
        snapshots of :meth:`evaluate` in ``snapshots.parquet``."""
        st, out = self.st, self.out
        opt = optimizer(self.model, st.optimizer, st.lr, st.weight_decay)
        steps_per_epoch = len(self.train_batches(0))
        sched = schedule(opt, st.epochs * steps_per_epoch, int(st.warmup_epochs * steps_per_epoch), st.lr,
                         st.warmup_lr, st.min_lr)
        start, metrics, snapshots = self._resume(out / "ckpt.pt", opt, sched)
        self.tracking = self.open_trackers()
        try:
            self._fit_epochs(start, metrics, snapshots, opt, sched, max_steps)
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

    def _fit_epochs(self, start: int, metrics: list[dict], snapshots: list[dict], opt, sched,
                    max_steps: int | None) -> None:
        st, out = self.st, self.out
        for epoch in range(start, st.epochs):
            t0 = time.time()
            terms, step_s, mix = self._train_epoch(epoch, opt, sched, max_steps)
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
                log.info(
                    f"{st.name} epoch {epoch + 1}/{st.epochs}: loss {row['loss_total']:.4f} (ce {row['loss_ce']:.3f} "
                    f"kd {row['loss_kd']:.3f} spec {row['loss_spec']:.4f}) val top-1 {ev['top1']:.2f}% "
                    f"({row['epoch_s']:.1f}s)"
                )
                atomic_torch_save(out / "ckpt.pt", {"model": self.model.state_dict(), "opt": opt.state_dict(),
                                                    "sched": sched.state_dict(), "epoch": epoch, "metrics": metrics,
                                                    "snapshots": snapshots})
                write_metrics(out / "metrics.parquet", metrics)
                if snapshots:
                    write_metrics(out / SNAPSHOTS, snapshots)
            self.tracking.epoch(epoch, row)
            dist.barrier()

    def _resume(self, ck: Path, opt, sched) -> tuple[int, list[dict], list[dict]]:
        """(first epoch to train, metrics so far, snapshots so far), from ``ck`` when it exists; an
        unreadable ``ck`` is set aside and the student trains from scratch (:func:`train.load_checkpoint`)."""
        from .train import load_checkpoint

        state = load_checkpoint(ck, f"student {self.st.name}", {"model": self.model, "opt": opt, "sched": sched},
                                needs=("epoch", "metrics"))
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
        sums = np.zeros(5)
        step_times = []
        batches = self.train_batches(epoch)
        mix = BatchMix(self.train_labels(epoch), st.batch_size)
        bar = tqdm(batches, total=len(batches), desc=f"{st.name} {epoch + 1}/{st.epochs}", leave=False,
                   disable=not dist.is_main() or None)
        for i, (x, y, rows, targets) in enumerate(bar):
            mix.add(y)
            y = batches.dataset.label_targets(y, rows, self.cfg.data.num_classes)  # mixed labels with mixing
            ts = time.perf_counter()
            try:
                terms = self.step(x, y, targets, opt)
            except NonFiniteTraining as e:
                raise NonFiniteTraining(f"{e} at epoch {epoch + 1} step {i + 1}; lower the lr or check the "
                                        f"loss weights") from None
            sched.step()
            it = terms.items()
            if self.st.track_steps:
                self.tracking.step(epoch * len(batches) + i, {**{f"loss_{k}": v for k, v in it.items()},
                                                              "lr": sched.get_last_lr()[0]})
            sums += np.array([it["total"], it["ce"], it["kd"], it["spec"], 1.0]) * len(y)
            step_times.append(time.perf_counter() - ts)
            if max_steps is not None and i + 1 >= max_steps:
                break
        self.check_finite_weights(epoch)
        tot = dist.all_reduce_sum(sums.tolist())
        n = max(1.0, tot[4])
        terms = {"loss_total": tot[0] / n, "loss_ce": tot[1] / n, "loss_kd": tot[2] / n, "loss_spec": tot[3] / n}
        return terms, float(np.mean(step_times)) if step_times else 0.0, mix


def snapshot_row(epoch: int, layer: int, sums: dict, width: int) -> dict:
    """One snapshot record: the layer's summed statistics, as plain numbers (Parquet, checkpoints)."""
    grid = sums["grid_energy"]
    return {"epoch": epoch, "layer": layer, "positions": int(sums["positions"]),
            "spectrum_sum": [float(v) for v in sums["spectrum_sum"]], "entropy_sum": float(sums["entropy_sum"]),
            "grid_height": int(grid.shape[0]), "width": int(width), "grid_energy": [float(v) for v in grid.ravel()]}


def write_metrics(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda f: pq.write_table(table, f))


def run_student(ctx) -> dict:
    """Build node ``distill/<name>``: train one student into ``ctx.out`` (the runner holds its lock,
    prepares the folder and records it).  A rerun resumes from ``ckpt.pt``; a training that fails
    is recorded in ``failed.json`` beside its checkpoint, and the next run retries it."""
    cfg: PipelineConfig = ctx.cfg
    name = student_name(ctx.stage)
    final = ctx.runner.out_dir(ctx.stage, ctx.fingerprint)
    if dist.is_main():
        (final / FAILED).unlink(missing_ok=True)
    st = cfg.student(name)
    cache = open_cache(ctx.upstream["extract"])
    check_cache_teacher(cache, ctx.upstream["teacher"])
    teacher = None
    if st.mode == "online" and st.loss.kind != "none":
        teacher = models.load_teacher(ctx.upstream["teacher"], cfg).to(models.resolve_device(st.device))
    try:
        return _train_into(ctx.runner, cfg, name, cache, teacher, ctx.options.get("max_steps"), ctx.out)
    except PipelineError as e:
        if dist.is_main():
            final.mkdir(parents=True, exist_ok=True)
            atomic_write_json(final / FAILED, {"student": name, "fingerprint": ctx.fingerprint, "error": str(e)})
        raise


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
    check_student(cache if st.mode == "cached" else None, tr.s_shapes, st, tr.pairs)
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
        "params": sum(p.numel() for p in tr.model.parameters()), "train_s": round(time.time() - t0, 1),
        "step_s": float(np.mean([m["step_s"] for m in metrics])),
    }
    if dist.is_main():
        atomic_torch_save(out / "final.pt", {"state_dict": tr.model.state_dict(), "model": st.model,
                                             "kwargs": st.kwargs})
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


def summary_table(teacher_summary: dict, cfg: PipelineConfig, rows: list[dict]) -> tuple[pa.Table, str]:
    """Every run (teacher first) as a table with its seed group, and the markdown summary: the runs,
    then, when some runs differ only by seed, their groups with mean, sd, n and paired differences."""
    from .groups import group_rows, groups_markdown, student_groups

    label = {name: g.label for g in student_groups(cfg) for name in g.members.values()}
    all_rows = [{"model": f"teacher ({cfg.teacher.model})", "kind": "teacher", "mode": "-", "group": "teacher",
                 "seed": None, "val_top1": teacher_summary.get("val_top1"),
                 "val_top5": teacher_summary.get("val_top5"), "params": teacher_summary.get("params")}]
    for r in rows:
        all_rows.append({"model": r["student"], "kind": r["kind"], "mode": r["mode"], "group": label[r["student"]],
                         "seed": r["seed"], "val_top1": r["val_top1"], "val_top5": r["val_top5"],
                         "params": r["params"]})
    table = pa.Table.from_pylist(all_rows)
    md = ["| model | kind | mode | seed | val top-1 | val top-5 | params |", "|---|---|---|---|---|---|---|"]
    for r in all_rows:
        t1 = f"{r['val_top1']:.2f}" if r["val_top1"] is not None else "-"
        t5 = f"{r['val_top5']:.2f}" if r["val_top5"] is not None else "-"
        seed = r["seed"] if r["seed"] is not None else "-"
        md.append(f"| {r['model']} | {r['kind']} | {r['mode']} | {seed} | {t1} | {t5} | {r['params'] or '-'} |")
    text = "\n".join(md) + "\n"
    groups = group_rows(cfg, {r["student"]: r["val_top1"] for r in rows})
    if cfg.distill.sweep or any(g["n"] > 1 for g in groups):
        text += "\nRuns that differ only by seed, grouped:\n\n" + groups_markdown(groups)
    return table, text


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
    node ``distill/<name>``), with seed groups and paired differences (:mod:`stages.sweep`)."""
    cfg: PipelineConfig = ctx.cfg
    if not cfg.distill.students:
        log.warning("distill: no students configured (distill.students is empty)")
    results = []
    for s in cfg.distill.students:
        rec = ctx.runner.record(student_node(s.name))
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
