"""Step time of cached SpectralKD distillation against no KD and against online distillation.

    python benchmarks/distill.py [--workdir DIR] [--epochs 1] [--repeat 3]

Builds the default pipeline up to extract (teacher not fitted: its weights do not change step
times), then trains the default student architecture for one epoch at a time as kind 'none',
'spectral' (cached) and 'spectral' (online), interleaved, and prints the per-step wall time of
each (data loading included: steps / epoch time, evaluation excluded) with the ratios, and the
teacher/student forward FLOP ratio from torch's FLOP counter.
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
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="bench-distill-")
    import numpy as np
    import torch

    from stages import models
    from stages import teacher as teacher_stage
    from stages.distill import Trainer
    from stages.extract import open_cache

    cfg, runner = default_runner(wd, ["teacher.fit=null"])
    recs = runner.run("extract")
    cache = open_cache(recs["extract"])
    teacher = teacher_stage.load(recs["teacher"], cfg).to(models.resolve_device(cfg.distill.defaults.device))
    tdepth = models.depth(teacher)
    spectral = next(s for s in cfg.distill.students if s.loss.kind == "spectral").name
    base = cfg.student(spectral)
    variants = {
        "none (cached rows, no KD)": base.model_copy(update={"loss": base.loss.model_copy(update={"kind": "none"})}),
        "spectral cached": base,
        "spectral online": base.model_copy(update={"mode": "online"}),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeat):
        for name, st in variants.items():
            tr = Trainer(cfg, st, cache, Path(wd) / "scratch", teacher_depth=tdepth,
                         teacher=teacher if st.mode == "online" else None)
            opt = torch.optim.AdamW(tr.model.parameters(), lr=st.lr)
            tr.model.train()
            n = 0
            t = time.perf_counter()
            for x, y, _, tg in tr.train_batches(rep):
                tr.step(x, y, tg, opt)
                n += 1
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / n)
    med = {k: float(np.median(v)) for k, v in times.items()}
    st_model = models.create(base.model, base.kwargs, cfg.data.num_classes)
    teacher = teacher.cpu()
    f_t, f_s = flops(teacher, cfg.data.image_size), flops(st_model, cfg.data.image_size)
    print(f"machine: {machine()}")
    print(f"student {base.model} {base.kwargs}, batch {base.batch_size}, pairs {base.layers}; "
          f"teacher {cfg.teacher.model}; {n} steps per epoch, median of {args.repeat} epochs")
    for k, v in med.items():
        print(f"  {k:<28}: {1000 * v:8.2f} ms/step")
    print(f"cached spectral / no KD      : {med['spectral cached'] / med['none (cached rows, no KD)']:.3f}"
          "   (goal <= 1.15)")
    print(f"online spectral / cached     : {med['spectral online'] / med['spectral cached']:.3f}")
    print(f"teacher / student fwd FLOPs  : {f_t / f_s:.2f}  ({f_t / 1e6:.1f} vs {f_s / 1e6:.1f} MFLOP per image)")


if __name__ == "__main__":
    main()
