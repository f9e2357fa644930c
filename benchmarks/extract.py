"""Extract throughput against the pure teacher forward, measured side by side in one run.

    python benchmarks/extract.py [--workdir DIR] [--repeat 3] [--set key=value ...]

Prints: rows/s of the extract teacher pass (decode + views + teacher + FFT + compression + writes)
and of the whole stage end to end (reading the sample index, planning, model load, manifest,
finalize: a first run, the previous run's output removed before the clock starts), rows/s of the
bare teacher forward on random tensors with the same model, batch size and threads (measured for
2 s right before and right after each run), their ratios, cache bytes per view per layer
and the compression ratio against raw float32.  The teacher's weights do not change its speed,
so the benchmark skips fitting it (``teacher.fit: null``).

On CPU it then prints the CPU time per row of each part of the extract measured alone, the ratio
those parts bound when the forward already keeps every core busy, and the teacher pass and the end
to end run as fractions of that bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import default_runner, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="bench-extract-")
    import torch

    from stages import models

    cfg, runner = default_runner(wd, ["teacher.fit=null", *args.overrides])
    recs = runner.run("teacher")
    model = models.load_teacher(recs["teacher"], cfg)
    device = models.resolve_device(cfg.extract.device)
    model.to(device)
    bs, size = cfg.extract.batch_size, cfg.data.image_size
    x = torch.randn(bs, 3, size, size, device=device)

    def forward_rate(seconds: float = 2.0, least: int = 3) -> float:
        """Rows/s of the bare forward over at least ``seconds`` and ``least`` batches."""
        with torch.inference_mode(), models.autocast(device, cfg.extract.amp):
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
            while n < least or time.perf_counter() - t < seconds:
                model(x)
                n += 1
                if device.type == "cuda" and n % 10 == 0:
                    torch.cuda.synchronize()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n * bs / (time.perf_counter() - t)

    ratios, e2e_ratios, fwd, ext = [], [], [], []
    summary = {}
    f_before = forward_rate()
    for _ in range(args.repeat):
        remove_output(runner, "extract")
        t = time.perf_counter()
        done = runner.run("extract")
        wall = time.perf_counter() - t
        f_after = forward_rate()
        summary = done["extract"].summary
        rate = summary["rows_computed"] / summary["teacher_pass_s"]
        f_mean = (f_before + f_after) / 2  # the forward measured right before and right after
        fwd.append(f_mean)
        ext.append(rate)
        ratios.append(rate / f_mean)
        e2e_ratios.append(summary["rows"] / wall / f_mean)
        f_before = f_after
    print(f"machine: {machine()}")
    print(f"teacher {cfg.teacher.model} {cfg.teacher.kwargs}, batch {bs}, layers {cfg.extract.layers}, "
          f"views {cfg.extract.views}, rows {summary['rows']}, workers {cfg.extract.num_workers}, device {device}")
    print(f"pure teacher forward     : {statistics.median(fwd):9.1f} rows/s (median of {len(fwd)})")
    print(f"extract teacher pass     : {statistics.median(ext):9.1f} rows/s (median of {len(ext)})")
    print(f"ratio extract/forward    : {statistics.median(ratios):.3f}   (median of per-run ratios "
          f"{[round(r, 3) for r in ratios]}; target on a GPU >= 0.90)")
    print(f"ratio end-to-end/forward : {statistics.median(e2e_ratios):.3f}   (per run "
          f"{[round(r, 3) for r in e2e_ratios]}; a first run: sample index, planning, model load, manifest, finalize)")
    print("extract time split (last run):", json.dumps(summary.get("teacher_pass_split", {})))
    print("cache bytes per view per layer:", json.dumps(summary["bytes_per_view"]))
    print("compression vs raw float32    :", json.dumps(summary["compression_vs_float32"]))
    print(f"cache total: {summary['cache_bytes'] / 2**20:.2f} MiB for {summary['rows']} rows")
    if device.type == "cpu":
        bound = cpu_budget(cfg, runner, done["extract"], model, x)
        print(f"teacher pass / bound     : {statistics.median(ratios) / bound:.3f}   (target >= 0.90)")
        print(f"end to end / bound       : {statistics.median(e2e_ratios) / bound:.3f}   (target >= 0.85)")


def remove_output(runner, name: str) -> None:
    """Remove stage ``name``'s output and its latest-run pointer, so that the next run is a first one."""
    import shutil

    shutil.rmtree(runner.out_dir(name), ignore_errors=True)
    runner.latest_path(name).unlink(missing_ok=True)


def cpu_budget(cfg, runner, record, model, x) -> float:
    """CPU milliseconds per row of each part of the extract, each measured alone (process CPU time,
    all threads), and the ratio they bound: on a machine whose cores the forward already fills,
    extract / forward cannot exceed forward / (forward + the rest), however well the parts overlap."""
    import torch

    from cache.reader import Cache
    from cache.shardfile import ShardEncoder
    from stages import models
    from stages.data import ViewDataset
    from cache.reader import cache_path
    from stages.spectral import spectrum

    bs = x.shape[0]

    def cpu_ms(fn, rows: int, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):
            t = time.process_time()
            fn()
            times.append((time.process_time() - t) * 1e3 / rows)
        return statistics.median(times)

    cache = Cache(cache_path(record))
    rows = cache.rows()
    n_fwd = 20
    with torch.inference_mode():
        model(x)
        fwd, extra = [], []
        t_end = time.perf_counter() + 4.0
        while len(fwd) < 5 or time.perf_counter() < t_end:  # one batch each, alternating: drift cancels
            a = cpu_ms(lambda: model(x), bs, repeat=1)
            b = cpu_ms(lambda: models.intermediates(model, x, cfg.extract.layers), bs, repeat=1)
            fwd.append(a)
            extra.append(b - a)
        parts = {"teacher forward (model(x))": statistics.median(fwd),
                 "forward_intermediates instead": statistics.median(extra)}
        idx = list(range(len(rows)))

        def decode_all():  # a fresh dataset each time: its decoded-image cache starts empty, as in extract
            views = ViewDataset.for_config(rows, cfg.data)
            for i in range(0, len(idx), bs):
                views.batch(idx[i : i + bs])

        parts["decode + view (decoded-image cache on)"] = cpu_ms(decode_all, len(idx))
        _, feats = models.intermediates(model, x, cfg.extract.layers)
        parts["spectra + float16 packing"] = cpu_ms(lambda: [torch.cat(
            [spectrum(f).to(torch.float16).reshape(bs, -1) for f in feats], 1).numpy() for _ in range(n_fwd)],
            n_fwd * bs)
    out = Path(tempfile.mkdtemp(prefix="bench-extract-write-"))
    rps = cache.spec.rows_per_shard
    encs = {n: ShardEncoder.for_array(cache.array(n), out / n) for n in cache.spec.arrays()}
    blocks = {n: cache.read(n, 0, rps) for n in encs}
    parts["compress + checksum + write + fsync"] = cpu_ms(
        lambda: [encs[n].write(s, blocks[n]) for s in range(3) for n in encs], 3 * rps)
    fwd = parts["teacher forward (model(x))"]
    rest = sum(v for k, v in parts.items() if k != "teacher forward (model(x))")
    print(f"CPU per row, each part alone ({torch.get_num_threads()} torch threads):")
    for k, v in parts.items():
        print(f"  {k:40s}: {v:.4f} ms ({100 * v / fwd:5.1f}% of the forward)")
    print(f"bound on extract/forward with every core busy in the forward: {fwd / (fwd + rest):.3f}")
    return fwd / (fwd + rest)


if __name__ == "__main__":
    main()
