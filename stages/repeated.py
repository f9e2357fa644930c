"""DeiT's repeated augmentation over stored views: r views of one image in the same batch.

DeiT's ``RASampler`` (``--repeated-aug``, on in its recipe with r = 3) repeats each image r times,
each copy augmented anew, and keeps an epoch about as long as the data set: ``ceil(N / r)`` images,
r views each.  With a cache of K' views per image the copies are stored views: epoch e takes the
views ``(e*r + j) mod K'`` (j < r) of each chosen image, so the epochs cycle through every stored
view.  Which images an epoch takes and their order are a pure function of (seed, sample key,
epoch) (:func:`stages.views.random_bits`), whatever order the shards list them in; under DDP each
rank takes its own images, the same number on every rank.

An epoch's rows lie in r view blocks at scattered positions: its targets are read unit by unit
(each unit read and checked once per epoch, or held in memory with ``keep_targets_mb``), r times
the bytes an epoch without repeats reads from disk.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from pipeline.errors import PipelineError

from .views import random_bits

RA_STREAM = 1 << 43  # the random numbers of epoch e's image choice: stream RA_STREAM + e


def epoch_views(epoch: int, repeats: int, views: int) -> list[int]:
    """The stored views epoch ``epoch`` takes of each image: r consecutive ones, cycling through K'."""
    if repeats > views:
        raise PipelineError(f"repeated_aug {repeats} needs at least that many stored views per image, the student "
                            f"reads {views}")
    return [(epoch * repeats + j) % views for j in range(repeats)]


def repeated_batches(image_rows: np.ndarray, key_hash: np.ndarray, repeats: int, batch_size: int, epoch: int,
                     seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches (lists of cache rows) of epoch ``epoch``.

    ``image_rows[i, v]`` is the row of image i in stored view v (-1: not trained on, e.g. a bad
    image); ``key_hash[i]`` its key's hash.  The epoch takes ``ceil(n / r)`` of the n usable images
    in a seeded order, r rows of each (:func:`epoch_views`), every row once; ranks take disjoint
    images, equally many; each image's rows are consecutive and ``batch_size`` is a multiple of r,
    so they share one batch."""
    if batch_size % repeats:
        raise PipelineError(f"batch_size {batch_size} is not a multiple of repeated_aug {repeats}: an image's "
                            f"{repeats} views must share a batch")
    views = epoch_views(epoch, repeats, image_rows.shape[1])
    usable = np.flatnonzero((image_rows[:, views] >= 0).all(axis=1))
    order = usable[np.argsort(random_bits(key_hash[usable], seed, RA_STREAM + epoch, 0), kind="stable")]
    chosen = order[: math.ceil(len(order) / repeats)]
    per_rank = len(chosen) // world if world > 1 else len(chosen)
    mine = chosen[rank :: world][:per_rank]
    rows = image_rows[mine][:, views].reshape(-1)
    return [rows[i : i + batch_size].tolist() for i in range(0, len(rows), batch_size)]


def image_rows_of(cache, rows, views: int, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image_rows, key hashes) of the train images: ``image_rows[i, v]`` is the row of image i in
    train view v < ``views`` (-1 where ``trained`` is False); images are view 0's samples."""
    b0 = cache.block("train", 0)
    samples = rows.sample[b0.start : b0.stop]
    out = np.full((len(samples), views), -1, dtype=np.int64)
    pos = np.full(int(rows.sample.max()) + 1, -1, dtype=np.int64)
    pos[samples] = np.arange(len(samples))
    for v in range(views):
        b = cache.block("train", v)
        r = np.arange(b.start, b.stop)
        keep = trained[r]
        out[pos[rows.sample[r[keep]]], v] = r[keep]
    return out, rows.samples.key_hashes()[samples]


class RepeatedBatches:
    """An epoch of repeated-augmentation batches, as :class:`stages.batches.CachedBatches` yields
    them: (x, y, rows, targets), the targets what ``targets`` reads (:class:`stages.batches.StudentTargets`)."""

    LRU_UNITS = 64  # units kept while an epoch reads without a memory budget

    def __init__(self, targets, dataset, batches: list[list[int]], num_workers: int = 0, memory: dict | None = None,
                 teacher_input=None):
        self.targets, self.dataset, self.batches = targets, dataset, batches
        self.teacher_input = teacher_input  # an online teacher normalized otherwise gets its own "teacher_x"
        self.num_workers = num_workers
        # unit -> target tensors: every unit, kept across epochs (a budget holds them all), or the
        # last LRU_UNITS read
        self.memory, self.keep = (memory, True) if memory is not None else (OrderedDict(), False)
        self.unit = targets.cache.chunk_rows()

    def __len__(self) -> int:
        return max(1, len(self.batches))

    def _unit_targets(self, u: int) -> dict:
        a, b = u * self.unit, min((u + 1) * self.unit, self.targets.cache.spec.rows)
        got = self.memory.get((a, b))
        if got is None:
            got = self.targets.tensors(self.targets.read(a, b))
            self.memory[(a, b)] = got
            while not self.keep and len(self.memory) > self.LRU_UNITS:
                self.memory.popitem(last=False)
        elif not self.keep:
            self.memory.move_to_end((a, b))
        return got

    def _targets(self, rows: np.ndarray) -> dict:
        if not self.targets.any:
            return {}
        units = rows // self.unit
        parts = {u: self._unit_targets(int(u)) for u in np.unique(units)}
        keys = next(iter(parts.values())).keys()
        return {k: torch.stack([parts[int(u)][k][r - u * self.unit] for r, u in zip(rows, units)]) for k in keys}

    def __iter__(self):
        from .data import view_loader

        for x, y, ok, idx in view_loader(self.dataset, self.batches, self.num_workers):
            rows = idx.numpy()
            self.dataset.require_readable(rows, ok.numpy(), np.ones(len(rows), dtype=bool))
            targets = self._targets(rows)
            if self.teacher_input is not None:
                targets["teacher_x"] = self.teacher_input.normalize(x, rows)
            yield self.dataset.normalize(x, rows), y, idx, targets

