"""A student's batches: rows of the cache in read units, their rebuilt views and teacher targets.

Rows come in chunk-aligned units (:func:`units_of`): the view loader builds a unit's pixels in
DataLoader workers while one reader thread (:class:`_ReadAhead`, two units ahead) reads its teacher
targets with numpy only (:meth:`StudentTargets.read`); a torch op in that thread would start a
second team of intra-op threads beside the training step's.  The training thread turns them into
tensors, pooled to the student's widths where the loss compares channels directly
(:meth:`StudentTargets.tensors`), and keeps them across epochs when they fit ``keep_targets_mb``.
:class:`BatchMix` says how well an epoch's batches mix the classes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.codec import decode_layers_torch
from cache.reader import Cache
from pipeline import dist

from .data import ViewDataset, view_loader
from .spectral import pool_channels

log = logging.getLogger("pipeline")


@dataclass
class StudentTargets:
    """What one student reads of the cache: the teacher's logits or not, teacher ``layers`` in
    ``form`` ('spectra' or 'features', :meth:`cache.reader.Cache.read_layer`), each pooled to
    ``widths[layer]`` channels once per read unit where given (float32; the others as read).

    With ``decode_on`` set (a GPU student's device), spectra are read as stored and decoded there
    (:func:`cache.codec.decode_layers_torch`, equal to the numpy decoder bit for bit): the reader
    thread only reads and decompresses, the device unpacks and dequantizes."""

    cache: Cache
    logits: bool = False
    layers: tuple[int, ...] = ()
    form: str = "spectra"
    widths: dict[int, int] = field(default_factory=dict)
    decode_on: torch.device | None = None

    @property
    def any(self) -> bool:
        return self.logits or bool(self.layers)

    @property
    def decodes_on_device(self) -> bool:
        """Whether the layers are decoded on ``decode_on`` (stored spectra, not pooled here)."""
        return (self.decode_on is not None and bool(self.layers) and self.form == "spectra"
                and "spectra" in self.cache.spec.store and not self.widths)

    def read(self, start: int, stop: int) -> dict:
        """Rows [start, stop) of every target as numpy arrays (the reader thread's part); with device
        decoding, the layers' stored parts under ``"encoded"``."""
        out = {}
        if self.logits:
            out["logits"] = self.cache.read("logits", start, stop)
        if self.decodes_on_device:
            out["encoded"] = self.cache.read_encoded_layers(list(self.layers), start, stop)
            return out
        for t in self.layers:
            out[t] = self.cache.read_layer(self.form, t, start, stop)
        return out

    def tensors(self, arrays: dict) -> dict:
        """The arrays of :meth:`read` as tensors, layers pooled to ``widths`` or decoded on the
        device (the training thread's part)."""
        out = {}
        for k, v in arrays.items():
            if k == "encoded":
                out.update(self._decoded(v))
                continue
            t = torch.from_numpy(v)
            w = self.widths.get(k)  # teacher layers only; None: kept as read
            out[k] = pool_channels(t.float(), w) if w is not None and w != t.shape[1] else t
        return out

    def _decoded(self, encoded: dict) -> dict:
        pin = self.decode_on.type == "cuda"
        parts = {i: {name: (torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a))
                        .to(self.decode_on, non_blocking=True) for name, a in p.items()}
                 for i, p in encoded.items()}
        return decode_layers_torch(self.cache.spec, parts, list(self.layers))

    def bytes_per_row(self) -> int:
        """Bytes per row of what :meth:`tensors` holds: the logits and the layers as read (float16
        where the cache stores the form, float32 where it is computed from the other), float32
        once pooled to a width."""
        spec = self.cache.spec
        out = spec.num_classes * 2 if self.logits else 0
        for t in self.layers:
            shape = self._layer_shape(t)
            w = self.widths.get(t)
            if w is not None and w != shape[0]:
                out += int(np.prod(shape[1:])) * w * 4
            else:
                out += int(np.prod(shape)) * (2 if self.form in spec.store else 4)
        return out

    def _layer_shape(self, t: int) -> tuple[int, ...]:
        """The per-row shape :meth:`read` gives teacher layer ``t``."""
        layer = self.cache.layer(t)
        if self.form == "spectra":
            return layer.spectrum_shape()
        channels = layer.channels if "features" in self.cache.spec.store else layer.stored_channels
        return (channels, layer.height, layer.width)


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
    """Batches of (x, y, row ids, teacher targets) over a ``block`` [start, stop) of cache rows.

    targets: what ``targets`` reads (:class:`StudentTargets`), {"logits": (B, K), <teacher layer
    index>: the layer in the student's form}; with ``teacher_input`` also "teacher_x", the batch
    normalized for an online teacher.  Images come from DataLoader workers; cache reads run in a
    prefetch thread of this process.
    """

    def __init__(
        self,
        targets: StudentTargets,
        dataset: ViewDataset,
        block: tuple[int, int],
        batch_size: int,
        seed: int,
        shuffle: bool,
        num_workers: int = 0,
        pool_units: int = 2,
        split_ranks: bool = True,
        memory: dict | None = None,
        train_mask: np.ndarray | None = None,
        teacher_input: ViewDataset | None = None,
    ):
        self.targets, self.dataset = targets, dataset
        # an online teacher normalized otherwise than the student gets its own input, "teacher_x"
        self.teacher_input = teacher_input
        cache = targets.cache
        self.unit = cache.chunk_rows()
        self.units = units_of(block[0], block[1], self.unit)
        self.batch_size = batch_size
        self.seed, self.shuffle, self.num_workers, self.pool_units = seed, shuffle, num_workers, pool_units
        self.split_ranks = split_ranks and dist.world_size() > 1
        # per cache row, whether it is trained on: extract could read it (``train_mask``: a subset of those)
        self.valid = cache.valid if train_mask is None else train_mask
        self.memory = memory  # unit -> target tensors, kept across epochs when given

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

    def _read_unit(self, u: int) -> tuple[bool, dict]:
        """Unit ``u``'s targets as (already held, arrays): from memory, or read from the cache
        (this runs in the reader thread: numpy only)."""
        a, b = self.units[u]
        if self.memory is not None and (a, b) in self.memory:
            return True, self.memory[(a, b)]
        return False, self.targets.read(a, b)

    def _unit_tensors(self, u: int, read: tuple[bool, dict]) -> dict:
        """Unit ``u``'s targets as tensors (:meth:`StudentTargets.tensors`, in the training thread),
        kept in memory when a budget is given."""
        held, arrays = read
        if held:
            return arrays
        out = self.targets.tensors(arrays)
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
        reads = _ReadAhead(self._read_unit if self.targets.any else (lambda u: (True, {})), order, ahead=2)
        rng = np.random.default_rng([self.seed, 2])
        pool: list[dict] = []
        limit = self._rank_steps(order)
        yielded = 0
        try:
            for i, u in enumerate(order):
                reads.start(i)
                x, y, ok, _ = next(loader)
                targets = self._unit_tensors(u, reads.result(i))
                a, b = self.units[u]
                rows = self.unit_rows(u)
                self.dataset.require_readable(rows, ok.numpy(), np.ones(len(rows), dtype=bool))
                keep = self.valid[a:b]
                if not keep.all():  # targets are read for the whole unit; images only for kept rows
                    sel = torch.from_numpy(keep)
                    targets = {k: v[sel.to(v.device)] for k, v in targets.items()}
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
            batch = {k: v.index_select(0, sel.to(v.device)) for k, v in merged.items()}
            x = self.dataset.normalize(batch["x"], batch["rows"])
            extras = {k: v for k, v in batch.items() if k not in ("x", "y", "rows")}
            if self.teacher_input is not None:
                extras["teacher_x"] = self.teacher_input.normalize(batch["x"], batch["rows"])
            yield x, batch["y"], batch["rows"], extras
        rest = perm[full:]
        pool.clear()
        if len(rest):
            pool.append({k: v[rest.to(v.device)] for k, v in merged.items()})


class _ReadAhead:
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
