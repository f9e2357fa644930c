"""Extract throughput against the pure teacher forward, measured side by side in one run.

    python benchmarks/extract.py [--workdir DIR] [--repeat 3] [--set key=value ...]

Prints: rows/s of the extract teacher pass (decode + views + teacher + FFT + compression + writes,
the one-time shard scan excluded; also end to end), rows/s of the bare teacher forward on random
tensors with the same model, batch size and threads, their ratio, cache bytes per view per layer
and the compression ratio against raw float32.  The teacher's weights do not change its speed,
so the benchmark skips fitting it (``teacher.fit: null``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

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
    from stages import teacher as teacher_stage

    cfg, runner = default_runner(wd, ["teacher.fit=null", *args.overrides])
    recs = runner.run("teacher")
    model = teacher_stage.load(recs["teacher"], cfg)
    device = models.resolve_device(cfg.extract.device)
    model.to(device)
    bs, size = cfg.extract.batch_size, cfg.data.image_size
    x = torch.randn(bs, 3, size, size, device=device)

    def forward_rate(n_batches: int) -> float:
        with torch.inference_mode(), models.autocast(device, cfg.extract.amp):
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n_batches):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return n_batches * bs / (time.perf_counter() - t)

    import statistics

    ratios, e2e_ratios, fwd, ext = [], [], [], []
    summary = {}
    f_before = forward_rate(10)
    for _ in range(args.repeat):
        t = time.perf_counter()
        done = runner.run("extract", force=True)
        wall = time.perf_counter() - t
        f_after = forward_rate(10)
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
          f"{[round(r, 3) for r in ratios]}; goal >= 0.90)")
    print(f"ratio end-to-end/forward : {statistics.median(e2e_ratios):.3f}   (incl. shard scan, planning, model load)")
    print("extract time split (last run):", json.dumps(summary.get("teacher_pass_split", {})))
    print("cache bytes per view per layer:", json.dumps(summary["bytes_per_view"]))
    print("compression vs raw float32    :", json.dumps(summary["compression_vs_float32"]))
    print(f"cache total: {summary['cache_bytes'] / 2**20:.2f} MiB for {summary['rows']} rows")


if __name__ == "__main__":
    main()
