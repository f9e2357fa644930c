"""Rows at ImageNet scale: planning time and resident bytes per row of the columnar row plan, of the
distill loader's index, and a worker's memory growth over an epoch of index lookups.

    python benchmarks/scale.py [--samples 1281167] [--views 10] [--classes 1000] [--shards 1024]
                               [--lookups 1000000]

Synthetic samples (keys like ImageNet's, no images).  Prints, side by side in one run:
- plan: seconds per million rows of ``plan_rows`` (view parameters drawn per column, seeded
  key-keyed permutation per view) and the bytes per row its columns hold;
- manifest: seconds to build and write the Parquet manifest, its bytes per row on disk;
- loader index: seconds to read the manifest back into the distill loader's rows
  (``rows_of_manifest``) and their bytes per row; the process's RSS growth per row for each step;
- worker growth: private memory (copy-on-write) a forked worker gains over ``--lookups`` index
  lookups (one view's block) against the same rows held as one Python object per row (the former
  layout), the mechanism by which every DataLoader worker used to grow.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from _common import ROOT, machine  # noqa: F401  (puts the project on the path)


def rss() -> int:
    """Resident bytes after returning the freed memory that allocators keep to the system."""
    import ctypes

    gc.collect()
    pa.default_memory_pool().release_unused()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def private_bytes() -> int:
    """Private (dirty + clean) bytes of this process: what copy-on-read adds after a fork."""
    out = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Dirty:", "Private_Clean:")):
                out += int(line.split()[1]) * 1024
    return out


def synthetic(n: int, classes: int, shards: int, seed: int = 0):
    from stages.shards import Samples

    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    keys = pa.array([f"n{c:08d}_{i}" for i, c in enumerate(label)])
    return Samples([f"/data/imagenet/train-{s:06d}.tar" for s in range(shards)],
                   (np.arange(n) * shards // n).astype(np.int32), keys, label,
                   rng.integers(0, 10**9, n), rng.integers(10**4, 2 * 10**5, n))


def nbytes_rows(rows) -> int:
    s = rows.samples
    per_sample = s.url.nbytes + s.key.nbytes + s.label.nbytes + s.offset.nbytes + s.size.nbytes + s.crc32.nbytes
    return per_sample + rows.sample.nbytes + sum(c.nbytes for c in rows.params.values())


def _lookups(rows, a: int, b: int, conn) -> None:
    before = private_bytes()
    acc = 0
    samples = rows.samples
    for i in range(a, b):
        p = rows.view_params(i)  # what ViewDataset.batch does per row, without decoding
        j = int(rows.sample[i])
        acc += int(samples.offset[j]) + len(samples.urls[samples.url[j]]) + int(p["flip"])
    conn.send(private_bytes() - before)


def _lookups_objects(objs, a: int, b: int, conn) -> None:
    before = private_bytes()
    acc = 0
    for i in range(a, b):
        s, p = objs[i]
        acc += s[3] + len(s[2]) + int(p["flip"])
    conn.send(private_bytes() - before)


def worker_growth(target, data, a: int, b: int) -> int:
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=target, args=(data, a, b, there))
    p.start()
    grown = here.recv()
    p.join()
    return grown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--object-baseline", type=int, default=1_000_000,
                    help="rows held as per-row Python objects for the worker-growth comparison (0: skip)")
    args = ap.parse_args()
    from pipeline.config import config_from_dict
    from cache.manifest import manifest_table, rows_of_manifest
    from stages.extract import plan_rows

    print(machine())
    n_val = max(1, args.samples // 25)
    train = synthetic(args.samples, args.classes, args.shards)
    val = synthetic(n_val, args.classes, max(1, args.shards // 16), seed=1)
    cfg = config_from_dict({"extract": {"views": args.views}, "data": {"augment": {"scale": [0.08, 1.0]}}})
    gc.collect()
    r0 = rss()
    t = time.perf_counter()
    rows, blocks = plan_rows(cfg, train, val)
    plan_s = time.perf_counter() - t
    n = len(rows)
    del train, val
    gc.collect()
    plan_rss = rss() - r0
    print(f"rows: {args.samples} samples x {args.views} views + {n_val} val = {n} rows")
    print(f"plan:     {plan_s:6.1f} s = {plan_s / n * 1e6:5.2f} s per million rows; "
          f"columns {nbytes_rows(rows) / n:5.1f} B/row, RSS growth {plan_rss / n:5.1f} B/row")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.parquet"
        t = time.perf_counter()
        import pyarrow.parquet as pq

        table = manifest_table(rows, blocks, 256, Path(tmp) / "cache.zarr", Path("/nonexistent"))
        pq.write_table(table, path, compression="zstd")
        man_s = time.perf_counter() - t
        del table
        print(f"manifest: {man_s:6.1f} s to build and write, {path.stat().st_size / n:5.1f} B/row on disk")
        gc.collect()
        r1 = rss()
        t = time.perf_counter()
        index = rows_of_manifest(pq.read_table(path), Path(tmp) / "cache.zarr")
        read_s = time.perf_counter() - t
        gc.collect()
        print(f"loader:   {read_s:6.1f} s to read back; index columns {nbytes_rows(index) / n:5.1f} B/row, "
              f"RSS growth {(rss() - r1) / n:5.1f} B/row")
    a, b = blocks[0]["start"], blocks[0]["start"] + min(args.lookups, blocks[0]["stop"] - blocks[0]["start"])
    grown = worker_growth(_lookups, index, a, b)
    line = f"worker:   {b - a} lookups in a forked worker grow its private memory by {grown / (b - a):6.1f} B/lookup"
    if args.object_baseline:
        m = min(args.object_baseline, b - a)
        objs = [((index.samples.key[int(index.sample[i])].as_py(), int(index.samples.label[int(index.sample[i])]),
                  index.samples.urls[int(index.samples.url[int(index.sample[i])])],
                  int(index.samples.offset[int(index.sample[i])]), 0), index.view_params(i)) for i in range(a, a + m)]
        gc.collect()
        old = worker_growth(_lookups_objects, objs, 0, m)
        line += f"; per-row Python objects (former layout, {m} rows): {old / m:6.1f} B/lookup"
    print(line)
    print("target at 1.28M x 10: plan < 30 s, < 100 B/row resident, no worker growth")


if __name__ == "__main__":
    main()
