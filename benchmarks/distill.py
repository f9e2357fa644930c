"""Step time of cached SpectralKD distillation against no KD and against online distillation.

    python benchmarks/distill.py [--workdir DIR] [--repeat 5] [--epochs-per-round 3] [--set KEY=VALUE ...]
    python benchmarks/distill.py --set extract.compress.quantize=int8   # from an int8 cache

Builds the default pipeline up to extract (teacher not fitted: its weights do not change step
times), then trains the default student architecture as kind 'none', 'spectral' (cached) and
'spectral' (online).  Variants take turns in rounds of a few consecutive epochs each (an epoch of
the default is 23 steps, too short to time alone on a shared machine), and the script prints the
median per-step wall time of each (data loading included: round time / steps, evaluation
excluded) with the ratios, and the teacher/student forward FLOP ratio from torch's FLOP counter.
The first K epochs (K = views) read the teacher targets from disk; later ones from memory
(distill.defaults.keep_targets_mb).  Two more cached variants never hold targets (keep_targets_mb
0): one reads shard files in one pass (cache.shardfile.ShardDecoder, the default), one through
zarr, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import default_runner, machine


def flops(model, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=5, help="rounds per variant")
    ap.add_argument("--epochs-per-round", type=int, default=3, help="consecutive epochs a variant trains per round")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="bench-distill-")
    import numpy as np
    import torch

    from stages import models
    from stages.trainer import Trainer
    from cache.reader import open_cache

    cfg, runner = default_runner(wd, ["teacher.fit=null", *args.overrides])
    recs = runner.run("extract")
    cache = open_cache(recs["extract"])
    teacher = models.load_teacher(recs["teacher"], cfg).to(models.resolve_device(cfg.distill.defaults.device))
    spectral = next(s for s in cfg.distill.students if s.loss.kind == "spectral").name
    base = cfg.student(spectral)
    zarr_cache = open_cache(recs["extract"])
    zarr_cache.one_pass = False  # the same cache read through zarr: the one-pass reader's baseline
    disk = {"keep_targets_mb": 0}
    variants = {
        "none (cached rows, no KD)": base.model_copy(update={"loss": base.loss.model_copy(update={"kind": "none"})}),
        "spectral cached": base,
        "spectral online": base.model_copy(update={"mode": "online"}),
        "spectral cached, disk": base.model_copy(update=disk),
        "spectral cached, disk, zarr": base.model_copy(update=disk),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    trainers = {name: Trainer(cfg, st, zarr_cache if name.endswith("zarr") else cache, Path(wd) / "scratch",
                              runner.model_plan, teacher=teacher if st.mode == "online" else None)
                for name, st in variants.items()}
    opts = {name: torch.optim.AdamW(tr.model.parameters(), lr=tr.st.lr) for name, tr in trainers.items()}
    per = args.epochs_per_round
    for r in range(args.repeat):  # rounds interleaved across variants; epoch e trains on view e mod K
        for name, tr in trainers.items():
            tr.model.train()
            n = 0
            t = time.perf_counter()
            for epoch in range(r * per, (r + 1) * per):
                for x, y, _, tg in tr.train_batches(epoch):
                    tr.step(x, y, tg, opts[name])
                    n += 1
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / n)
    n //= per
    med = {k: float(np.median(v)) for k, v in times.items()}
    st_model = models.create(base.model, base.kwargs, cfg.data.num_classes)
    teacher = teacher.cpu()
    f_t, f_s = flops(teacher, cfg.data.image_size), flops(st_model, cfg.data.image_size)
    print(f"machine: {machine()}")
    print(f"student {base.model} {base.kwargs}, batch {base.batch_size}, pairs {base.pairs}; "
          f"teacher {cfg.teacher.model}; {n} steps per epoch, median of {args.repeat} rounds of {per} epochs")
    k_views = cache.view_count("train")
    for k, v in med.items():
        rounds = ", ".join(f"{1000 * x:.1f}" for x in times[k])
        print(f"  {k:<28}: {1000 * v:8.2f} ms/step  (per round: {rounds})")
    none_key = "none (cached rows, no KD)"
    ratio = [s / b for s, b in zip(times["spectral cached"], times[none_key])]
    cold_rounds = -(-k_views // per)  # rounds with an epoch whose view is read for the first time
    cold, warm = ratio[:cold_rounds], ratio[cold_rounds:]
    print(f"cached spectral / no KD      : {float(np.median(ratio)):.3f}   (median of per-round ratios; target 1.15)")
    print(f"  rounds reading targets from disk (first {k_views} epochs): {', '.join(f'{c:.3f}' for c in cold)}")
    if warm:
        print(f"  later rounds, targets in memory : median {float(np.median(warm)):.3f} of {len(warm)}")
    for k in ("spectral cached, disk", "spectral cached, disk, zarr"):
        r = [s / b for s, b in zip(times[k], times[none_key])]
        print(f"{k + ' / no KD':<29}: {float(np.median(r)):.3f}   (keep_targets_mb 0: every epoch reads the cache)")
    online = [o / c for o, c in zip(times["spectral online"], times["spectral cached"])]
    print(f"online spectral / cached     : {float(np.median(online)):.3f}   (median of per-round ratios)")
    print(f"teacher / student fwd FLOPs  : {f_t / f_s:.2f}  ({f_t / 1e6:.1f} vs {f_s / 1e6:.1f} MFLOP per image)")
    snapshot_cost(trainers["spectral cached"], med["spectral cached"] * n, args.repeat * per)


def snapshot_cost(tr, train_epoch_s: float, repeat: int) -> None:
    """What a dynamics snapshot adds to an epoch: the evaluation with layer statistics against the
    plain evaluation (training steps are untouched: snapshots run in the evaluation's forward pass)."""
    import numpy as np

    every = tr.st.snapshot_every
    times = {0: [], 1: []}
    for _ in range(repeat):
        for snap in (0, 1):  # interleaved
            tr.st.snapshot_every = snap
            t = time.perf_counter()
            tr.evaluate(0)
            times[snap].append(time.perf_counter() - t)
    tr.st.snapshot_every = every
    plain, snap = float(np.median(times[0])), float(np.median(times[1]))
    one = (train_epoch_s + snap) / (train_epoch_s + plain)
    n = max(1, every)
    print(f"snapshot epoch / plain epoch : {one:.3f}   (evaluation {1000 * plain:.0f} -> {1000 * snap:.0f} ms, "
          f"train {1000 * train_epoch_s:.0f} ms; per-step cost 0: statistics come from the evaluation's forward "
          f"pass); over snapshot_every={n}: {1 + (one - 1) / n:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
