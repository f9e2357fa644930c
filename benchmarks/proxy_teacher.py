"""A trained proxy of the paper's cache shape: a 14 x 14 token grid, 8 layers, 128 wide, fitted here.

    nice -n 10 python benchmarks/proxy_teacher.py [--workdir work/proxy] [--epochs 12] [--set KEY=VALUE ...]

The paper's teacher (CaiT-S24) caches 8 layers of 384 x 14 x 14 per view.  Random weights have none
of a trained ViT's structure (consecutive layers one residual update apart, energy in a few
frequencies and channels, a few dominant channels), so size measurements need a trained teacher of
that map size.  This one is the embedded digits at 56 px with 4 px patches (a 14 x 14 grid), a ViT
of 8 blocks, 128 wide, mean-pooled (timm's ViT has no layer scale: a CaiT's LayerScale starts its
residual branches at 1e-5, so a CaiT fitted for a few epochs has consecutive layers nearly equal,
which would flatter delta coding), fitted on CPU by the pipeline's own teacher stage; every one of
its 8 layers is cached (1 train view per image), the default's students replaced by students of
width 64 and depth 2 at the same grid (``STUDENT``, ``PAIRS``, ``STUDENT_TRAINING``).  Everything
is built in ``--workdir`` (``work/`` is ignored by git) by the pipeline itself, so a rerun with
the same settings reuses it: the fixture is a cache, not a file in the repository.
``benchmarks/cache_size.py --proxy`` and ``benchmarks/read_path.py --proxy`` read it through
:func:`proxy_overrides`.  Digits are grey 8 x 8 images scaled up: a patch holds little more than
one grey level, so the first layers' channels span few directions, and every compression measured
on this proxy is more favourable than ImageNet's would be.

It prints the teacher's val top-1 and the fit's wall time.  On the 2-core development machine an
epoch of the fit takes about 55 s idle, and 12 min with the machine shared by a dozen jobs.
"""

from __future__ import annotations

import argparse
import time

from _common import ROOT, default_runner, machine

WORKDIR = ROOT / "work" / "proxy"
EPOCHS = 3  # a short schedule, annealed: the machine this was built on ran 20 min per epoch under load
STUDENT = {"img_size": 56, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
# student block -> teacher block: the first and the last, half the teacher's width as DeiT-Tiny is CaiT-S24's
PAIRS = [[0, 1], [1, 7]]
# students short enough for a shared 2-core machine: 40 images per class, 5 epochs, evaluated at the end
STUDENT_TRAINING = "{epochs: 5, batch_size: 32, lr: 0.002, weight_decay: 0.05, warmup_epochs: 0.5, " \
                   "train_per_class: 40, eval_every: 5, snapshot_every: 0}"


def proxy_overrides(epochs: int = EPOCHS, checkpoint: str | None = None) -> list[str]:
    """The ``--set`` values that turn the default pipeline into the proxy (``checkpoint``: weights
    to load instead of fitting, e.g. a copy of an unfinished fit's ``fit_ckpt.pt``)."""
    teacher = "{img_size: 56, patch_size: 4, embed_dim: 128, depth: 8, num_heads: 4, global_pool: avg}"
    student = "{" + ", ".join(f"{k}: {v}" for k, v in STUDENT.items()) + "}"
    students = ("[{name: deit-none, model: deit_tiny_patch16_224, kwargs: %s, loss: {kind: none}}, "
                "{name: deit-spectral, model: deit_tiny_patch16_224, kwargs: %s, pairs: %s, "
                "loss: {kind: spectral}}]" % (student, student, PAIRS))
    return ["data.image_size=56", "teacher.model=vit_tiny_patch16_224", f"teacher.kwargs={teacher}",
            *([f"teacher.checkpoint={checkpoint}", "teacher.fit=null"] if checkpoint else
              [f"teacher.fit={{epochs: {epochs}, batch_size: 32, lr: 0.0005, weight_decay: 0.05, "
               "warmup_epochs: 0.25, label_smoothing: 0.1}"]),
            "extract.layers=[0, 1, 2, 3, 4, 5, 6, 7]", "extract.views=1", "extract.batch_size=64",
            f"distill.defaults={STUDENT_TRAINING}", f"distill.students={students}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(WORKDIR))
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="teacher fit epochs")
    ap.add_argument("--checkpoint", default=None, help="weights to load instead of fitting (teacher.fit: null)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg, runner = default_runner(args.workdir, proxy_overrides(args.epochs, args.checkpoint) + args.overrides)
    t0 = time.perf_counter()
    recs = runner.run("extract")
    print(f"machine: {machine()}")
    print(f"proxy teacher {cfg.teacher.model} {cfg.teacher.kwargs}: val top-1 "
          f"{recs['teacher'].summary.get('val_top1')}%, fit wall {recs['teacher'].lock.get('wall_s')} s; "
          f"cache {recs['extract'].path} ({time.perf_counter() - t0:.0f} s this run)")


if __name__ == "__main__":
    main()
