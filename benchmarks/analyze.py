"""Dask analysis throughput: 2 workers vs 1, and Dask vs a plain numpy loop, in one run.

    python benchmarks/analyze.py [--rows 8192] [--channels 96] [--arrays 4] [--repeat 5]

Writes synthetic float16 feature arrays (rows, C, 8, 8) to a sharded Zarr store, then computes the
channel spectra, intensities, radial energies and channel entropies of all of them three ways: a
LocalCluster with 1 worker, with 2 workers (1 thread each), and a plain single-process numpy loop
over the same shards calling the same per-chunk function as the Dask tasks
(``stages.analyze._metrics_block``).  Prints MB/s of float16 input and the ratios.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import numpy as np

from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--channels", type=int, default=96)
    ap.add_argument("--arrays", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    args = ap.parse_args()
    import dask.array as da
    import zarr
    from distributed import Client

    from stages.analyze import _metrics_block, dask_channel_spectra, local_cluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    d = tempfile.mkdtemp(prefix="bench-analyze-")
    g = zarr.open_group(d + "/f.zarr", mode="w")
    shape = (args.channels, 8, 8)
    rng = np.random.default_rng(0)
    zs = {}
    for i in range(args.arrays):
        z = g.create_array(f"a{i}", shape=(args.rows, *shape), dtype="float16",
                           chunks=(args.rows_per_shard // 4, *shape), shards=(args.rows_per_shard, *shape))
        for a in range(0, args.rows, args.rows_per_shard):
            z[a : a + args.rows_per_shard] = rng.normal(size=(min(args.rows_per_shard, args.rows - a), *shape))
        zs[f"a{i}"] = z
    mb = args.arrays * args.rows * int(np.prod(shape)) * 2 / 1e6

    def numpy_loop():
        out = {}
        for k, z in zs.items():
            sums = 0
            for a in range(0, args.rows, args.rows_per_shard):
                sums = sums + _metrics_block(z[a : a + args.rows_per_shard], 4)
            out[k] = sums
        return out

    arrays = {k: da.from_zarr(z, chunks=z.shards) for k, z in zs.items()}
    clusters = {n: local_cluster(n, 1) for n in (1, 2)}
    clients = {n: Client(c) for n, c in clusters.items()}
    try:
        for client in clients.values():
            dask_channel_spectra(arrays, 4, progress=False, client=client)  # warm the workers
        times = {"numpy": [], 1: [], 2: []}
        for _ in range(args.repeat):  # interleaved, so the machine's drift hits all three alike
            times["numpy"].append(_t(numpy_loop))
            for n, client in clients.items():
                times[n].append(_t(lambda c=client: dask_channel_spectra(arrays, 4, progress=False, client=c)))
    finally:
        for n in clients:
            clients[n].close()
            clusters[n].close()
    t_np, t1, t2 = (statistics.median(times[k]) for k in ("numpy", 1, 2))
    pairs = [a / b for a, b in zip(times[1], times[2])]
    print(f"machine: {machine()}")
    print(f"data: {args.arrays} arrays x ({args.rows}, {args.channels}, 8, 8) float16 = {mb:.0f} MB, "
          f"{args.rows // args.rows_per_shard} shards each")
    print(f"numpy loop (1 process): {mb / t_np:8.1f} MB/s")
    print(f"dask 1 worker         : {mb / t1:8.1f} MB/s")
    print(f"dask 2 workers        : {mb / t2:8.1f} MB/s")
    print(f"2 workers / 1 worker  : {statistics.median(pairs):.3f}   (median of {len(pairs)} interleaved rounds: "
          f"{', '.join(f'{r:.3f}' for r in pairs)}; target >= 1.7)")
    print(f"dask (2 workers) / numpy loop: {t_np / t2:.3f}")


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
