"""One cache, every distillation method: the registry's methods trained from one teacher pass.

    python benchmarks/study_losses.py [--workdir work/study/losses] [--jobs 2] [--seeds 5]
                                      [--methods dkd,fitnets,...] [--no-compact] [--set KEY=VALUE ...]

Runs ``configs/study_losses.yaml`` (the embedded digits, 20 images per class, 400 epochs, 16 cached
views; its header says which setting and why) and its compact group: the methods that read teacher
layers again, from a cache of the same extract with ``compress.pool`` 16 (the students' width) and
int8 spectra.  It prints and writes, under the workdir:

* ``study_losses.md``: per method and cache, val top-1 mean +- sd (n), the paired difference (by
  seed) to no KD and to SpectralKD on the main cache with its 95% t interval
  (:func:`stages.groups.paired_difference`), the seconds each student trained, and what it read of
  which cache; then each cache's bytes;
* ``study_losses.json``: every student's numbers.

Every stage is the pipeline's own (``python -m pipeline``, its log and progress shown as it runs): a
rerun reuses what is up to date, so an interrupted study resumes.  ``--reuse DIR`` (default ``work``
when it exists) lends the default run's teacher, which the study's config shares, and
``work/study/main`` (benchmarks/offline_vs_online.py) its main cache when there.  A quick check of
the script end to end: ``--seeds 1 --methods none,spectral,dkd,fitnets --set distill.defaults.epochs=2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import yaml
from _common import OVERRIDES, ROOT, machine, run_pipeline, runner_of, write_yaml

CONFIG = ROOT / "configs" / "study_losses.yaml"
COMPACT = {"pool": 16, "quantize": "int8"}  # the students' width; the cheapest setting of benchmarks/cache_size.py
SOURCES = {"main": "cache", "compact": "compact cache (pool 16 + int8)"}
BASELINES = {"none": "no KD", "spectral": "SpectralKD"}






def reads_layers(base: dict) -> bool:
    """Whether a sweep's base student reads teacher layers (its loss, with its pairs)."""
    import losses
    from pipeline.config import StudentConfig

    st = StudentConfig.model_validate(base)
    return losses.needs(st.loss, st.pairs).reads_layers


def study_configs(root: Path, seeds: int, methods: list[str] | None, compact: bool) -> dict[str, Path]:
    """The study's configs under ``root`` with ``seeds`` seeds: 'main' (the study config, its sweeps
    limited to ``methods`` when given) and, with ``compact``, 'compact' (its sweeps that read teacher
    layers, from a pooled int8 cache)."""
    tree = yaml.safe_load(CONFIG.read_text())
    sweeps = tree["distill"]["sweep"]
    names = [sw["base"]["name"] for sw in sweeps]
    unknown = sorted(set(methods or []) - set(names))
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in {CONFIG.name} ({', '.join(names)})")
    sweeps = [sw for sw in sweeps if methods is None or sw["base"]["name"] in methods]
    for sw in sweeps:
        sw["grid"]["seed"] = list(range(seeds))
    tree["distill"]["sweep"] = sweeps
    out = {"main": write_yaml(root / "study.yaml", tree)}
    layered = [copy.deepcopy(sw) for sw in sweeps if reads_layers(sw["base"])]
    if compact and layered:
        small = copy.deepcopy(tree)
        small["extract"]["compress"] = dict(small["extract"].get("compress") or {}, **COMPACT)
        small["distill"]["sweep"] = layered
        out["compact"] = write_yaml(root / "study_compact.yaml", small)
    return out




def what_it_read(st) -> str:
    """What a student read of its cache besides its views: the teacher's logits, its layers as
    spectra (pooled to the student's width) or as feature maps (irfft2 of the stored spectra)."""
    import losses

    needs = losses.needs(st.loss, st.pairs)
    parts = ["logits"] if needs.logits else []
    layers = f"{len(st.pairs)} layer{'s' if len(st.pairs) != 1 else ''}"
    if needs.form == "spectra":
        parts.append(f"spectra of {layers}" + (", pooled to its width" if needs.pooled else ""))
    elif needs.form == "features":
        parts.append(f"features of {layers} (irfft2 of the spectra)")
    return " + ".join(parts) or "views only"


def students(conf: Path, workdir: Path, upstream: list[Path], source: str) -> list[dict]:
    """One dict per student of ``conf``: its method, cache, seed, top-1, seconds and what it read."""
    from pipeline.nodes import student_node

    cfg, runner = runner_of(conf, workdir, upstream)
    runs = cfg.distill.sweep_runs()
    out = []
    for s in cfg.distill.students:
        st = cfg.student(s.name)
        rec = runner.record(student_node(s.name))
        if rec is None:
            raise SystemExit(f"{s.name}: no finished output in {workdir}")
        method = cfg.distill.sweep[runs[s.name][0]].base["name"]
        out.append({"student": s.name, "method": method, "kind": st.loss.kind, "source": source,
                    "seed": st.seed, "val_top1": rec.summary["val_top1"], "train_s": rec.summary["train_s"],
                    "read": what_it_read(st), "epochs": st.epochs})
    return out


def cache_bytes(conf: Path, workdir: Path, upstream: list[Path]) -> dict:
    cfg, runner = runner_of(conf, workdir, upstream)
    rec = runner.record("extract")
    return {"bytes": int(rec.summary["cache_bytes"]), "views": cfg.extract.views, "path": str(rec.path),
            "wall_s": float(rec.lock.get("wall_s") or 0.0)}


def groups(rows: list[dict]) -> list[dict]:
    """Students grouped by (method, cache), each with the paired difference (by seed) to no KD and
    to SpectralKD on the main cache."""
    from stages.groups import paired_difference

    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["method"], r["source"]), []).append(r)
    by_seed = {k: {r["seed"]: r["val_top1"] for r in rs} for k, rs in keyed.items()}
    out = []
    for (method, source), rs in keyed.items():
        acc = by_seed[(method, source)]
        vals = np.array(list(acc.values()), dtype=np.float64)
        g = {"method": method, "kind": rs[0]["kind"], "source": source, "n": len(rs), "seeds": sorted(acc),
             "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
             "train_s": float(np.mean([r["train_s"] for r in rs])), "read": rs[0]["read"]}
        for base in BASELINES:
            ref = by_seed.get((base, SOURCES["main"]))
            if ref is not None and (method, source) != (base, SOURCES["main"]):
                g[f"diff_{base}"] = paired_difference(acc, ref)
        out.append(g)
    order = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(out, key=lambda g: (list(SOURCES.values()).index(g["source"]), order.index(g["method"])))


def diff_text(d: dict | None) -> str:
    if d is None:
        return "reference"
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (n={d['n']}, no interval)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] (n={d['n']})"


def table(gs: list[dict]) -> str:
    """The Markdown table: one row per method and cache."""
    lines = ["| method | kind | cache | val top-1 mean +- sd (n) | vs no KD (95% interval) "
             "| vs SpectralKD (95% interval) | s per student | read |", "|---|---|---|---|---|---|---|---|"]
    for g in gs:
        sd = f" +- {g['sd']:.2f}" if not math.isnan(g["sd"]) else ""
        lines.append(f"| {g['method']} | {g['kind']} | {g['source']} | {g['mean']:.2f}{sd} ({g['n']}) | "
                     f"{diff_text(g.get('diff_none'))} | {diff_text(g.get('diff_spectral'))} | {g['train_s']:.0f} | "
                     f"{g['read']} |")
    return "\n".join(lines) + "\n"


def lent_workdirs(reuse: str | None) -> list[Path]:
    """Workdirs whose outputs the study may use: the default run's (its teacher) and the cached-vs-online
    study's (its main cache is this study's)."""
    out = [Path(reuse or ROOT / "work").resolve(), (ROOT / "work" / "study" / "main").resolve()]
    return [p for p in dict.fromkeys(out) if p.is_dir()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="work/study/losses")
    ap.add_argument("--jobs", type=int, default=2, help="students trained at once (one core each)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default=None, help="comma-separated sweep names of the config (default: all)")
    ap.add_argument("--no-compact", dest="compact", action="store_false", help="skip the compact-cache group")
    ap.add_argument("--reuse", default=None, help="a workdir whose teacher the study may use (default: work)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="a config override for every run (e.g. distill.defaults.epochs=2 for a quick check)")
    args = ap.parse_args()
    OVERRIDES.extend(args.overrides)
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lend = lent_workdirs(args.reuse)
    methods = args.methods.split(",") if args.methods else None
    confs = study_configs(root, args.seeds, methods, args.compact)
    upstream = {name: (lend if name == "main" else [root / "main", *lend]) for name in confs}
    t0 = time.perf_counter()
    walls = {}
    for name, conf in confs.items():
        walls[f"{name} extract"] = run_pipeline(conf, root / name, upstream[name], "run", "extract")
        walls[f"{name} distill"] = run_pipeline(conf, root / name, upstream[name], "run", "distill", "--jobs",
                                            str(args.jobs))
    total = time.perf_counter() - t0
    rows = [r for name in confs for r in students(confs[name], root / name, upstream[name], SOURCES[name])]
    gs = groups(rows)
    caches = {name: cache_bytes(confs[name], root / name, upstream[name]) for name in confs}
    epochs = sorted({r["epochs"] for r in rows})
    text = [f"Machine: {machine()}",
            f"Study: {', '.join(p.name for p in confs.values())} in {root}, {args.seeds} seeds, "
            f"{'/'.join(map(str, epochs))} epochs" + (f", overrides {' '.join(OVERRIDES)}" if OVERRIDES else ""), "",
            table(gs),
            *(f"Cache '{SOURCES[name]}': {c['bytes'] / 2**20:.1f} MiB, {c['views']} views per train image "
              f"({c['path']})" for name, c in caches.items()),
            f"Wall: study {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in walls.items())})"]
    report = "\n".join(text) + "\n"
    print("\n" + report)
    (root / "study_losses.md").write_text(report)
    (root / "study_losses.json").write_text(json.dumps({"students": rows, "groups": gs, "caches": caches,
                                                        "walls": walls}, indent=1))
    print(f"wrote {root / 'study_losses.md'}, .json")


if __name__ == "__main__":
    main()
