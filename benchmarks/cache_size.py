"""Bytes per view of each cache encoding, scaled to the paper's shape, and what each saving costs.

    python benchmarks/cache_size.py [--proxy] [--workdir DIR] [--errors 0.01,0.02,0.05]
                                    [--students step-0.02-delta --seeds 5] [--set KEY=VALUE ...]

Builds the default pipeline (``--proxy``: the trained 14 x 14 proxy of ``benchmarks/proxy_teacher.py``,
in ``work/proxy``) up to its exact cache, then every encoding as a tier derived from that cache
(``stages.tier``: the teacher is not run again), one per row of the table:

* student-agnostic (any student width): ``exact`` (Hermitian-packed float16, the extract's cache),
  ``int8`` (per row and channel), ``step-E`` (a quantization table per layer and frequency calibrated
  to a relative error E, entropy-coded by blosc-zstd over bit planes), ``step-E-delta`` (each
  layer stored as its difference from the previous block's decoded values), ``step-E-basis`` and
  ``step-E-delta-basis`` (the channels turned by the calibration rows' principal components first);
* width-specific (pooled to the spectral student's width W at derivation): ``poolW``,
  ``poolW-int8``, ``poolW-step-E-delta``.

For each it prints bytes per view on disk (spectra and logits), bits per stored value counted at
the teacher's width (so a pooled cache's bits are spread over the values it replaces), the same
bits scaled to the paper's shape (8 layers of 384 x 14 x 14 per view; its 1000 float16 logits
added: 2000 B), the 0th-order entropy of the stored integers (an ideal entropy coder of each
layer and frequency's integers, for the step encodings), and the relative error of the
spectral-loss gradient with respect to the student's features ``||g - g_exact|| / ||g_exact||``
against float32 targets computed live from the teacher, at an untrained student and at one
trained from the exact cache (seed 0).  ``--students`` names encodings whose spectral students
train for ``--seeds`` seeds beside the exact cache's: val top-1 mean +- sd (n) and the paired
difference to the exact cache's students with its 95% interval (``stages.groups.paired_difference``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile

import numpy as np
from _common import ROOT, default_runner, machine

PAPER_VALUES = 8 * 384 * 14 * 14  # values per view of the paper's cached layers (CaiT-S24, 8 layers)
PAPER_LOGITS = 2 * 1000  # float16 logits of ImageNet-1k
DISK_KB = 4e12 / (1.28e6 * 30) / 1000  # KB per view that puts 30 views of ImageNet on a 4 TB disk


def encodings(width: int, errors: list[float]) -> dict[str, tuple[bool, dict]]:
    """name -> (student-agnostic, the tier's compress settings); 'exact' is the extract's cache."""
    out: dict[str, tuple[bool, dict]] = {"exact": (True, {}), "int8": (True, {"quantize": "int8"})}
    middle = errors[len(errors) // 2]
    for e in errors:  # every part alone and combined at the middle error; the combination at each error
        if e == middle:
            out[f"step-{e:g}"] = (True, {"quantize": "step", "error": e})
            out[f"step-{e:g}-delta"] = (True, {"quantize": "step", "error": e, "delta": True})
            out[f"step-{e:g}-basis"] = (True, {"quantize": "step", "error": e, "basis": True})
        out[f"step-{e:g}-delta-basis"] = (True, {"quantize": "step", "error": e, "delta": True, "basis": True})
    out[f"pool{width}"] = (False, {"pool": width})
    out[f"pool{width}-int8"] = (False, {"pool": width, "quantize": "int8"})
    out[f"pool{width}-step-{middle:g}-delta-basis"] = (False, {"pool": width, "quantize": "step", "error": middle,
                                                               "delta": True, "basis": True})
    return out


def student_width(cfg, name: str) -> int:
    """The channel count of the spectral student's paired layers (one width for all of them)."""
    import torch

    from stages import models

    st = cfg.student(name)
    m = models.create(st.model, st.kwargs, cfg.data.num_classes).eval()
    with torch.no_grad():
        _, feats = models.intermediates(m, torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size),
                                        [s for s, _ in st.pairs])
    widths = {int(f.shape[1]) for f in feats}
    if len(widths) != 1:
        raise SystemExit(f"student {name} has layers of widths {sorted(widths)}; this benchmark pools to one")
    return widths.pop()


def val_batch(cache, cfg, n: int):
    from stages.data import ViewDataset

    b = cache.block("val")
    ds = ViewDataset.for_config(cache.rows(), cfg.data)
    x, _, ok, rows = ds.batch(range(b.start, min(b.start + n, b.stop)))
    assert bool(ok.all())
    return ds.normalize(x, rows), (b.start, b.start + len(x))


def exact_spectra(teacher, x, layers: list[int]) -> dict:
    """Teacher layer -> float32 spectra computed live (the reference every encoding is compared to)."""
    import torch

    from stages import models
    from stages.spectral import spectrum

    with torch.no_grad():
        _, feats = models.intermediates(teacher, x, layers)
    return {t: spectrum(f) for t, f in zip(layers, feats)}


def gradient_error(student, x, pairs, exact: dict, targets: dict) -> float:
    """||g(targets) - g(exact)|| / ||g(exact)||, g = d(spectral loss) / d(student features)."""
    import torch
    import torch.nn.functional as F

    from stages import models
    from stages.spectral import pool_channels, spectrum

    with torch.no_grad():
        _, feats = models.intermediates(student, x, [s for s, _ in pairs])

    def grad(specs: dict) -> torch.Tensor:
        leaves = [f.detach().clone().requires_grad_(True) for f in feats]
        loss = torch.stack([F.mse_loss(spectrum(f), pool_channels(specs[t].float(), f.shape[1]))
                            for f, (_, t) in zip(leaves, pairs)]).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, leaves)])

    ge = grad(exact)
    return float((grad(targets) - ge).norm() / ge.norm())


def disk_bytes_per_row(cache) -> tuple[float, float]:
    """Bytes per row on disk of the logits and of every array of the cached spectra."""
    names = [n for layer in cache.spec.layers for n in cache.spec.spectrum_parts(layer).values()]
    size = {n: sum(p.stat().st_size for p in (cache.path / n).rglob("*") if p.is_file()) for n in ["logits", *names]}
    rows = cache.spec.rows
    return size["logits"] / rows, sum(size[n] for n in names) / rows


def teacher_values(cache) -> int:
    """Values per view of the cached layers at the teacher's width."""
    return sum(la.channels * la.height * la.width for la in cache.spec.layers)


def entropy_bits(cache, rows: tuple[int, int]) -> float:
    """Bits per teacher-width value an ideal coder of each (layer, packed number)'s integers would
    need (0th order, over ``rows``); nan for encodings without integers of a table."""
    if cache.spec.quantize != "step":
        return math.nan
    from cache.codec import unzigzag

    bits = 0.0
    for layer in cache.spec.layers:
        q = unzigzag(cache.read_encoded(layer.index, *rows)["values"])  # (n, C, HW)
        for j in range(q.shape[2]):
            _, counts = np.unique(q[:, :, j], return_counts=True)
            p = counts / counts.sum()
            bits += float(-(p * np.log2(p)).sum()) * q.shape[1]
    return bits / teacher_values(cache)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", action="store_true", help="the trained 14 x 14 proxy (benchmarks/proxy_teacher.py)")
    ap.add_argument("--proxy-checkpoint", default=None, help="the proxy's weights, as proxy_teacher.py --checkpoint")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--errors", default="0.01,0.02,0.05", help="relative errors of the step encodings")
    ap.add_argument("--rows", type=int, default=128, help="val rows for gradient errors and entropies")
    ap.add_argument("--students", default="", help="encodings whose students train beside the exact cache's")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--clevel", type=int, default=3, help="the tiers' compression level")
    ap.add_argument("--only", default="", help="measure only these encodings (and the exact cache)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    import torch

    from cache.reader import open_cache
    from pipeline.errors import PipelineError
    from pipeline.graph import Runner
    from stages import models
    from stages.groups import paired_difference

    base = []
    if args.proxy:
        from proxy_teacher import WORKDIR, proxy_overrides

        base = proxy_overrides(checkpoint=args.proxy_checkpoint)
    wd = args.workdir or (str(WORKDIR) if args.proxy else tempfile.mkdtemp(prefix="bench-cache-size-"))
    cfg, _ = default_runner(wd, base + args.overrides)
    spectral = next(s.name for s in cfg.distill.students if s.loss.kind == "spectral")
    width = student_width(cfg, spectral)
    errors = [float(e) for e in args.errors.split(",")]
    encs = encodings(width, errors)
    chosen = [n for n in args.students.split(",") if n]
    for n in chosen:
        if n not in encs:
            raise SystemExit(f"--students: {n!r} is not an encoding ({', '.join(encs)})")
    st0 = cfg.distill.students[[s.name for s in cfg.distill.students].index(spectral)].model_dump(exclude_none=True)
    tiers = [{"name": n, "compress": c, "clevel": args.clevel} for n, (_, c) in encs.items() if n != "exact"]
    seeds = {n: range(max(args.seeds, 1) if n == "exact" else args.seeds) for n in ["exact", *chosen]}
    students = [{**st0, "name": f"{n}-s{s}", "seed": s, **({"tier": n} if n != "exact" else {})}
                for n, ss in seeds.items() for s in ss]
    cfg, runner = default_runner(wd, base + args.overrides + [f"tiers={json.dumps(tiers)}",
                                                              f"distill.students={json.dumps(students)}"])
    recs = runner.run("extract")
    teacher = models.load_teacher(recs["teacher"], cfg)
    exact_cache = open_cache(recs["extract"])
    caches = {"exact": exact_cache}
    refused = {}
    for n in encs if not args.only else ["exact", *args.only.split(",")]:
        if n != "exact":
            print(f"  tier {n} ...", flush=True)
            try:
                caches[n] = open_cache(runner.run(f"tier/{n}")[f"tier/{n}"])
            except PipelineError as e:  # e.g. a step too small for the integers' range
                refused[n] = str(e)
    pairs = list(runner.model_plan.pairs["exact-s0"])
    layers = sorted({t for _, t in pairs})
    x, rows = val_batch(exact_cache, cfg, args.rows)
    exact = exact_spectra(teacher, x, layers)
    torch.manual_seed(0)
    st = cfg.student("exact-s0")
    untrained = models.create(st.model, st.kwargs, cfg.data.num_classes).eval()
    top1: dict[str, dict[int, float]] = {}
    for name, ss in seeds.items():
        top1[name] = {}
        for s in ss:
            print(f"  student {name}-s{s} ...", flush=True)
            r = Runner(cfg, {"students": [f"{name}-s{s}"]})
            rec = r.run(f"distill/{name}-s{s}")[f"distill/{name}-s{s}"]
            top1[name][s] = float(rec.summary["val_top1"])
    trained = models.load_student(runner, cfg, "exact-s0")

    print(f"machine: {machine()}")
    la = exact_cache.spec.layers
    print(f"{'proxy' if args.proxy else 'default'} teacher {cfg.teacher.model} {cfg.teacher.kwargs}; "
          f"{len(la)} cached layers of {la[0].channels} x {la[0].height} x {la[0].width}; {exact_cache.spec.rows} "
          f"rows; student {spectral} width {width}, pairs {pairs}; {args.rows} val rows; tiers at blosc/zstd level "
          f"{args.clevel}; paper shape: {PAPER_VALUES} values + {PAPER_LOGITS} B logits per view; 30 views on 4 TB: "
          f"{DISK_KB:.0f} KB per view")
    head = (f"{'encoding':<22} {'agnostic':>8} {'B/view':>9} {'spectra':>9} {'bits/val':>8} {'entropy':>7} "
            f"{'paper KB':>9} {'grad err untrained':>18} {'trained':>8}")
    print(head)
    print("-" * len(head))
    tv = teacher_values(exact_cache)
    for name, (agnostic, _) in encs.items():
        if name not in caches and name not in refused:
            continue
        if name in refused:
            print(f"{name:<22} refused: {refused[name]}")
            continue
        cache = caches[name]
        logit_b, spec_b = disk_bytes_per_row(cache)
        bits = spec_b * 8 / tv
        targets = {t: torch.from_numpy(cache.read_layer("spectra", t, *rows)).float() for t in layers}
        e_u = gradient_error(untrained, x, pairs, exact, targets)
        e_t = gradient_error(trained, x, pairs, exact, targets)
        paper = (bits * PAPER_VALUES / 8 + PAPER_LOGITS) / 1000
        print(f"{name:<22} {'yes' if agnostic else 'no':>8} {logit_b + spec_b:>9.0f} {spec_b:>9.0f} {bits:>8.3f} "
              f"{entropy_bits(cache, rows):>7.3f} {paper:>9.1f} {e_u:>18.5f} {e_t:>8.5f}", flush=True)
    if top1:
        print("\nstudents (val top-1 after the config's epochs), paired by seed with the exact cache's:")
        for name in top1:
            acc = list(top1[name].values())
            sd = statistics.stdev(acc) if len(acc) > 1 else math.nan
            line = f"  {name:<22} {statistics.mean(acc):.2f} +- {sd:.2f} (n={len(acc)}) {acc}"
            if name != "exact":
                d = paired_difference(top1[name], top1["exact"])
                line += f"   - exact: {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            print(line)
    print(f"(config root {ROOT})")


if __name__ == "__main__":
    main()
