"""Bytes per view of each cache encoding, and what each saving costs: gradient error and student top-1.

    python benchmarks/cache_size.py [--workdir DIR] [--seeds 3] [--set KEY=VALUE ...]
    python benchmarks/cache_size.py --set teacher.kwargs.embed_dim=192      # a wider teacher

Builds the default pipeline (or the one ``--set`` makes) up to the fitted teacher once, then one
cache per encoding (``extract.compress``):

* ``float16 dense``: the dense half-spectrum (``packed: false``), the format-2 layout;
* ``packed``: Hermitian-packed float16 (the default; lossless);
* ``int8``: packed, int8 with a float16 scale per (row, channel);
* ``pool``: packed float16 pooled at extract to the spectral student's width (serves that width only);
* ``pool int8``: both.

For each it prints bytes per view on disk (all cached layers and the logits), the ratio against
float32 dense spectra and logits, encode and decode throughput, and the relative error of the
spectral-loss gradient with respect to the student's features, ``||g - g_exact|| / ||g_exact||``,
against targets computed in float32 from the teacher, at an untrained student and at one trained
from the packed cache (seed 0).  Then the val top-1 of the config's spectral student trained from
each cache (``--seeds`` seeds, mean +- sd).  Two rows are measured but not offered: a per-layer PCA
channel basis of rank C/4 and C/2 (fitted on 512 train rows, coefficients float16, basis bytes
not counted), to show what a low-rank encoding would cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import default_runner, machine

SEED_KEY = "distill.defaults.seed"


def settings(width: int) -> dict[str, list[str]]:
    return {
        "float16 dense": ["extract.compress.packed=false"],
        "packed": [],
        "int8": ["extract.compress.quantize=int8"],
        f"pool {width}": [f"extract.compress.pool={width}"],
        f"pool {width} int8": [f"extract.compress.pool={width}", "extract.compress.quantize=int8"],
    }


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


def pca_targets(cache, exact: dict, rank_frac: float, fit_rows: int = 512) -> tuple[dict, float]:
    """Targets through a per-layer channel basis of rank C * rank_frac fitted on train rows (float64
    SVD of the packed spectra, uncentred), coefficients rounded to float16; and the coefficients'
    bytes per row over all cached layers (uncompressed)."""
    import torch

    from cache.codec import pack, unpack

    b = cache.block("train")
    out = {}
    nbytes = sum(max(1, int(la.stored_channels * rank_frac)) * la.height * la.width * 2 for la in cache.spec.layers)
    for t, dense in exact.items():
        layer = cache.layer(t)
        fit = torch.from_numpy(cache.read_layer("spectra", t, b.start, b.start + fit_rows)).double()
        rows = pack(fit, layer.width).movedim(1, -1).reshape(-1, layer.stored_channels)
        rank = max(1, int(layer.stored_channels * rank_frac))
        basis = torch.linalg.svd(rows, full_matrices=False)[2][:rank].T  # (C, r)
        p = pack(dense.double(), layer.width).movedim(1, -1)  # (B, HW, C)
        coef = (p @ basis).half().double()
        out[t] = torch.from_numpy(unpack((coef @ basis.T).movedim(-1, 1).numpy(), layer.height, layer.width)).float()
    return out, nbytes


def disk_bytes_per_row(cache) -> tuple[float, float]:
    """Bytes per row on disk of the logits and of every array of the cached spectra."""
    names = [n for layer in cache.spec.layers for n in cache.spec.spectrum_parts(layer).values()]
    size = {n: sum(p.stat().st_size for p in (cache.path / n).rglob("*") if p.is_file()) for n in ["logits", *names]}
    rows = cache.spec.rows
    return size["logits"] / rows, sum(size[n] for n in names) / rows


def throughput(cache, exact: dict, rows: tuple[int, int]) -> tuple[float, float]:
    """(encode rows/s over all layers from float32 spectra, decode rows/s of read_layer from disk)."""
    from cache.codec import encode
    from stages.spectral import pool_channels

    spec = cache.spec
    pooled = {t: pool_channels(s, cache.layer(t).stored_channels) for t, s in exact.items()}
    n = rows[1] - rows[0]
    t0 = time.perf_counter()
    for t, s in pooled.items():
        encode(s, cache.layer(t).width, spec.packed, spec.quantize)
    enc = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for t in exact:
        cache.read_layer("spectra", t, *rows)
    dec = n / (time.perf_counter() - t0)
    return enc, dec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=256, help="val rows for gradient error and throughput")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    wd = args.workdir or tempfile.mkdtemp(prefix="bench-cache-size-")

    import torch

    from cache.reader import open_cache
    from pipeline.graph import Runner
    from stages import models

    cfg, runner = default_runner(wd, args.overrides)
    spectral = next(s.name for s in cfg.distill.students if s.loss.kind == "spectral")
    width = student_width(cfg, spectral)
    teacher = models.load_teacher(runner.run("teacher")["teacher"], cfg)
    pairs = list(runner.model_plan.pairs[spectral])
    layers = sorted({t for _, t in pairs})
    st = cfg.student(spectral)
    torch.manual_seed(0)
    untrained = models.create(st.model, st.kwargs, cfg.data.num_classes).eval()

    def cache_for(extra: list[str]):
        c, r = default_runner(wd, args.overrides + extra)
        return c, open_cache(r.run("extract")["extract"])

    def top1(extra: list[str], seed: int) -> tuple[float, object]:
        c, _ = default_runner(wd, args.overrides + extra + [f"{SEED_KEY}={seed}"])
        r = Runner(c, {"students": [spectral]})
        r.run("distill")
        return _student_top1(r, spectral), (c, r)

    results = {}
    trained = None
    exact = None
    for name, extra in settings(width).items():
        c, cache = cache_for(extra)
        if exact is None:
            x, rows = val_batch(cache, c, args.rows)
            exact = exact_spectra(teacher, x, layers)
        logit_b, spec_b = disk_bytes_per_row(cache)
        accs = []
        for seed in range(args.seeds):
            acc, (cs, rs) = top1(extra, seed)
            accs.append(acc)
            if name == "packed" and seed == 0:
                trained = models.load_student(rs, cs, spectral)
        targets = {t: torch.from_numpy(cache.read_layer("spectra", t, *rows)).float() for t in layers}
        enc, dec = throughput(cache, exact, rows)
        results[name] = {"logits": logit_b, "spectra": spec_b, "targets": targets, "top1": accs, "enc": enc,
                         "dec": dec}
        print(f"  {name}: built, top-1 {accs}", flush=True)
    if trained is None:
        raise SystemExit("no trained student: the 'packed' setting needs --seeds >= 1")

    c, packed = cache_for([])
    layer_list = packed.spec.layers
    raw32_spec = sum(4 * la.channels * la.height * (la.width // 2 + 1) * 2 for la in layer_list)
    raw32_logits = 4 * cfg.data.num_classes
    print(f"machine: {machine()}")
    print(f"teacher {cfg.teacher.model} {cfg.teacher.kwargs}; cached layers: "
          + ", ".join(f"{la.index} ({la.channels}x{la.height}x{la.width})" for la in layer_list)
          + f"; student {spectral}, width {width}; {args.rows} val rows; {args.seeds} seeds")
    print(f"float32 reference: spectra {raw32_spec} B + logits {raw32_logits} B per view")
    head = (f"{'setting':<16} {'B/view':>8} {'spectra':>8} {'logits':>7} {'ratio':>6} {'enc r/s':>9} {'dec r/s':>9} "
            f"{'grad err untrained':>18} {'trained':>9}  top-1 mean +- sd (n)")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        total = r["logits"] + r["spectra"]
        e_u = gradient_error(untrained, x, pairs, exact, r["targets"])
        e_t = gradient_error(trained, x, pairs, exact, r["targets"])
        sd = statistics.stdev(r["top1"]) if len(r["top1"]) > 1 else float("nan")
        print(f"{name:<16} {total:>8.0f} {r['spectra']:>8.0f} {r['logits']:>7.0f} "
              f"{(raw32_spec + raw32_logits) / total:>6.2f} {r['enc']:>9.0f} {r['dec']:>9.0f} "
              f"{e_u:>18.5f} {e_t:>9.5f}  {statistics.mean(r['top1']):.2f} +- {sd:.2f} ({len(r['top1'])})")
    for frac in (0.25, 0.5):
        targets, nbytes = pca_targets(packed, exact, frac)
        e_u = gradient_error(untrained, x, pairs, exact, targets)
        e_t = gradient_error(trained, x, pairs, exact, targets)
        logit_b = results["packed"]["logits"]
        total = nbytes + logit_b
        print(f"{f'pca C*{frac:g} *':<16} {total:>8.0f} {nbytes:>8.0f} {logit_b:>7.0f} "
              f"{(raw32_spec + raw32_logits) / total:>6.2f} "
              f"{'':>9} {'':>9} {e_u:>18.5f} {e_t:>9.5f}  (not offered; raw float16 coefficients)")
    print("ratio: float32 dense spectra + logits over the bytes stored on disk (zstd "
          f"{cfg.extract.clevel}); * measured only, not an extract.compress option")


def _student_top1(runner, name: str) -> float:
    from pipeline.fsutil import read_json

    return float(read_json(runner.student_dir(name) / "lock.json")["summary"]["val_top1"])


if __name__ == "__main__":
    main()
