"""extract's rows on their way to the cache: batches that never cross a shard, each shard's rows
gathered as arrays (checked finite in the stored dtype), and writer threads that write finished
shards behind a bounded queue (each shard by exactly one thread: writers own whole shards)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cache.layout import CacheSpec
from cache.writer import CacheWriter
from pipeline.errors import PipelineError


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


class ShardWriters:
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


class ShardBuffers:
    """The rows of the shard being filled, as float16/uint8 arrays; a finished shard goes to the
    writers.  Batches arrive shard by shard (:class:`ShardBatches`)."""

    def __init__(self, spec: CacheSpec, writers: ShardWriters, path: Path | None = None):
        self.spec, self.writers, self.path = spec, writers, path
        self.arrays = spec.arrays()
        self.shard, self.buf, self.bad = -1, {}, []

    def start(self, s: int) -> float:
        """Make shard ``s`` current (-1: none), handing a finished one to the writers; returns the
        seconds spent waiting for them."""
        if s == self.shard:
            return 0.0
        t = time.perf_counter()
        if self.shard >= 0:
            self.writers.put((self.shard, self.buf, self.bad))
        waited = time.perf_counter() - t
        self.shard, self.bad = s, []
        if s >= 0:
            a, b = self.spec.shard_rows(s)
            self.buf = {n: np.zeros((b - a, *shape), dtype=dt) for n, (shape, dt) in self.arrays.items()}
        return waited

    def add(self, idx: np.ndarray, out: dict[str, torch.Tensor], ok: np.ndarray, bad: list[dict]) -> None:
        """Rows ``idx`` of the current shard: the arrays of each dtype in one device-to-host copy,
        after checking that the read rows' values are finite in the stored dtype."""
        local = idx - self.shard * self.spec.rows_per_shard
        by_dtype: dict[str, list[str]] = {}
        for n in out:
            by_dtype.setdefault(self.arrays[n][1], []).append(n)
        for dtype, names in by_dtype.items():
            torch_dtype = getattr(torch, dtype)
            flat = torch.cat([out[n].to(torch_dtype).reshape(len(idx), -1) for n in names], dim=1)
            if flat.is_floating_point() and (_nonfinite_rows(flat) & ok).any():
                self._refuse_nonfinite(idx, out, ok, names, torch_dtype)
            flat = flat.cpu().numpy()
            flat[~ok] = 0
            col = 0
            for n in names:
                shape = self.arrays[n][0]
                width = int(np.prod(shape))
                self.buf[n][local] = flat[:, col : col + width].reshape(len(idx), *shape)
                col += width
        self.buf["valid"][local] = ok.astype(np.uint8)
        self.bad += bad

    def _refuse_nonfinite(self, idx: np.ndarray, out: dict[str, torch.Tensor], ok: np.ndarray, names: list[str],
                          dtype: torch.dtype) -> None:
        """Raise naming the first array of ``names`` with a non-finite value on a read row of the batch."""
        for n in names:
            rows = np.flatnonzero(_nonfinite_rows(out[n].to(dtype).reshape(len(idx), -1)) & ok)
            if len(rows):
                raise PipelineError(
                    f"{self.path}: {n} is not finite (nan or inf in {dtype}) on {len(rows)} of rows "
                    f"{int(idx[0])}..{int(idx[-1])} of shard {self.shard} (first: row {int(idx[rows[0]])}); the "
                    f"teacher's outputs are not finite, the cache is left incomplete: check the teacher's weights "
                    f"and data.mean/std")

    def close(self) -> None:
        self.writers.close()


def _nonfinite_rows(flat: torch.Tensor) -> np.ndarray:
    """Per row of a (B, n) float batch, whether any value is nan or inf: on the device on a GPU, with
    numpy on the CPU (float16 by its exponent bits: several times faster there than ``isfinite``)."""
    if flat.device.type != "cpu":
        return (~torch.isfinite(flat).all(dim=1)).cpu().numpy()
    a = flat.numpy()
    if a.dtype == np.float16:
        return ((a.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    return ~np.isfinite(a).all(axis=1)
