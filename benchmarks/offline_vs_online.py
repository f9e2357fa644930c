"""Does the cache cost accuracy?  Cached against online students, views per image, a compact cache.

    python benchmarks/offline_vs_online.py [--workdir work/study] [--jobs 2] [--seeds 5]

Runs ``configs/study_offline_vs_online.yaml`` (the embedded digits; its header says which setting
and why) and three variants: a compact cache, more views per image (cached SpectralKD at K' = 32
and 64 from a 64-view cache), and the embedded default's regime (every train image, 40 epochs:
cached SpectralKD at K' = 1, 2, 16 against online SpectralKD and no KD).  It prints and writes,
under the workdir:

* ``offline_vs_online.md``: per regime and group of seeds, val top-1 mean +- sd (n), the paired
  difference to the online student of the same loss with its 95% t interval, the intensity-profile
  distance to the teacher (analyze), and the seconds each student trained; then the wall time of a
  whole sweep of seeds cached (extract + students) and online, and the caches' bytes;
* ``offline_vs_online.png``: val top-1 against cached views per image, one panel per regime, one
  line per loss, the online students as bands (mean +- sd);
* ``offline_vs_online.json``: every student's numbers.

Every stage is the pipeline's own (``python -m pipeline``, its log and progress shown as it runs):
a rerun reuses what is up to date, so an interrupted study resumes.  ``--reuse DIR`` (default
``work`` when it exists) lends the default run's teacher, which the study's config shares.
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

CONFIG = ROOT / "configs" / "study_offline_vs_online.yaml"
COMPACT = {"pool": 16, "quantize": "int8"}  # the cheapest setting of benchmarks/cache_size.py within noise
KINDS = ("none", "logits", "spectral")
LABEL = {"none": "no KD", "logits": "logits KD", "spectral": "SpectralKD"}




def study_configs(root: Path, seeds: int, more_views: int) -> dict[str, Path]:
    """The study's configs, written under ``root`` with ``seeds`` seeds: 'main' (the study config),
    'compact' (cached SpectralKD on every view of a pooled int8 cache), with ``more_views`` 'more'
    (cached SpectralKD at K' = 32, 64, ... up to ``more_views`` from a cache of that many views; its
    first views are the main cache's, as views are keyed by their index), and 'full' (the default's
    regime: every train image, 40 epochs, on the main cache)."""
    tree = yaml.safe_load(CONFIG.read_text())
    for sw in tree["distill"]["sweep"]:
        sw["grid"]["seed"] = list(range(seeds))
    base = next(sw["base"] for sw in tree["distill"]["sweep"] if sw["base"]["name"] == "cached")
    spectral = dict(copy.deepcopy(base), loss=dict(base["loss"], kind="spectral"))
    out = {"main": write_yaml(root / "study.yaml", tree)}
    compact = copy.deepcopy(tree)
    compact["extract"]["compress"] = dict(compact["extract"].get("compress") or {}, **COMPACT)
    compact["distill"]["sweep"] = [{"base": dict(spectral, name="compact"), "grid": {"seed": list(range(seeds))}}]
    out["compact"] = write_yaml(root / "study_compact.yaml", compact)
    k = tree["extract"]["views"]
    extra = [2**i for i in range(1, 16) if k < 2**i <= more_views]
    if extra:
        more = copy.deepcopy(tree)
        more["extract"]["views"] = extra[-1]
        more["distill"]["sweep"] = [{"base": dict(spectral, name="more"),
                                     "grid": {"views": extra, "seed": list(range(seeds))}}]
        out["more"] = write_yaml(root / "study_more_views.yaml", more)
    full = copy.deepcopy(tree)  # the embedded default's regime: every train image, 40 epochs
    full["distill"]["defaults"].update(epochs=40, train_per_class=None, eval_every=10)
    online = next(sw["base"] for sw in tree["distill"]["sweep"] if sw["base"]["name"] == "online")
    full["distill"]["sweep"] = [
        {"base": dict(spectral, name="full"), "grid": {"views": [1, 2, 16], "seed": list(range(seeds))}},
        {"base": dict(copy.deepcopy(online), name="full-online"),
         "grid": {"loss.kind": ["none", "spectral"], "seed": list(range(seeds))}}]
    out["full"] = write_yaml(root / "study_all_images.yaml", full)
    return out






def students(conf: Path, workdir: Path, upstream: list[Path], source: str) -> list[dict]:
    """One dict per student of ``conf``: its group (regime, kind, source, views), seed, top-1,
    seconds, and the intensity-profile distance analyze measured."""
    from pipeline.nodes import student_node

    cfg, runner = runner_of(conf, workdir, upstream)
    analyze = runner.record("analyze")
    distance = analyze.summary.get("profile_distance", {}) if analyze else {}
    out = []
    for s in cfg.distill.students:
        st = cfg.student(s.name)
        rec = runner.record(student_node(s.name))
        if rec is None:
            raise SystemExit(f"{s.name}: no finished output in {workdir}")
        fresh = st.views == "fresh"
        k = rec.summary.get("views")
        if st.loss.kind == "none":  # no teacher: fresh views or the cache's
            group_source = "fresh" if fresh else source
        else:
            group_source = "online" if st.mode == "online" else source
        regime = f"{st.train_per_class or 'all'} images per class, {st.epochs} epochs"
        out.append({"student": s.name, "regime": regime, "kind": st.loss.kind, "source": group_source,
                    "views": "fresh" if fresh else int(k), "seed": st.seed, "val_top1": rec.summary["val_top1"],
                    "train_s": rec.summary["train_s"], "profile_distance": distance.get(s.name, math.nan)})
    return out


def cache_bytes(conf: Path, workdir: Path, upstream: list[Path]) -> dict:
    cfg, runner = runner_of(conf, workdir, upstream)
    rec = runner.record("extract")
    from cache.reader import open_cache

    rows = len(open_cache(rec).valid)
    return {"bytes": int(rec.summary["cache_bytes"]), "views": cfg.extract.views, "rows": rows,
            "wall_s": float(rec.lock.get("wall_s") or 0.0),
            "spectra_bytes_per_view": sum(rec.summary.get("bytes_per_view", {}).values())}


def groups(rows: list[dict]) -> list[dict]:
    """Students grouped by (regime, kind, source, views), with the paired difference (by seed) to
    the online student of the same regime and kind (no KD: to no KD on fresh views)."""
    from stages.groups import paired_difference

    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["regime"], r["kind"], r["source"], r["views"]), []).append(r)
    ref_of = {k: ("online" if k != "none" else "fresh") for k in KINDS}
    out = []
    for (regime, kind, source, views), rs in keyed.items():
        acc = {r["seed"]: r["val_top1"] for r in rs}
        ref = keyed.get((regime, kind, ref_of[kind], "fresh"))
        g = {"regime": regime, "kind": kind, "source": source, "views": views, "n": len(rs), "seeds": sorted(acc),
             "mean": float(np.mean(list(acc.values()))), "sd": float(np.std(list(acc.values()), ddof=1)),
             "profile_distance": float(np.nanmean([r["profile_distance"] for r in rs])),
             "profile_distance_sd": float(np.nanstd([r["profile_distance"] for r in rs], ddof=1)),
             "train_s": float(np.mean([r["train_s"] for r in rs])), "train_s_sum": float(sum(r["train_s"] for r in rs))}
        if ref is not None and ref is not rs:
            g["diff"] = paired_difference(acc, {r["seed"]: r["val_top1"] for r in ref})
        out.append(g)
    order = {"fresh": 0, "online": 1, "cached": 2, "compact": 3}
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    return sorted(out, key=lambda g: (regimes.index(g["regime"]), KINDS.index(g["kind"]), order[g["source"]],
                                      0 if g["views"] == "fresh" else g["views"]))


def name_of(g: dict) -> str:
    if g["source"] in ("fresh", "online"):
        return f"{LABEL[g['kind']]}, {'online teacher, ' if g['source'] == 'online' else ''}fresh views"
    where = "compact cache" if g["source"] == "compact" else "cache"
    return f"{LABEL[g['kind']]}, {where}, K'={g['views']}"


def table(gs: list[dict]) -> str:
    """One Markdown table per regime (data size and epochs)."""
    out = []
    for regime in dict.fromkeys(g["regime"] for g in gs):
        lines = [f"**{regime}**", "", "| student | views per image | n | val top-1 mean +- sd | paired difference to "
                 "online (95% interval) | profile distance to teacher | s per student |",
                 "|---|---|---|---|---|---|---|"]
        for g in (g for g in gs if g["regime"] == regime):
            d = g.get("diff")
            diff = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "reference"
            lines.append(f"| {name_of(g)} | {g['views']} | {g['n']} | {g['mean']:.2f} +- {g['sd']:.2f} | {diff} | "
                         f"{g['profile_distance']:.4f} +- {g['profile_distance_sd']:.4f} | {g['train_s']:.0f} |")
        out.append("\n".join(lines) + "\n\n" + kd_margin([g for g in gs if g["regime"] == regime]) + "\n")
    return "\n".join(out)


def kd_margin(gs: list[dict]) -> str:
    """Online SpectralKD against no KD on fresh views, in pooled standard deviations."""
    on = next((g for g in gs if g["kind"] == "spectral" and g["source"] == "online"), None)
    base = next((g for g in gs if g["kind"] == "none" and g["source"] == "fresh"), None)
    if on is None or base is None:
        return ""
    pooled = math.sqrt((on["sd"] ** 2 + base["sd"] ** 2) / 2)
    return (f"online SpectralKD - no KD (fresh views): {on['mean'] - base['mean']:+.2f} points = "
            f"{(on['mean'] - base['mean']) / pooled:.1f} pooled sd (pooled sd {pooled:.2f})")


def plot(gs: list[dict], path: Path) -> None:
    """Val top-1 against cached views per image, one panel per regime: cached students as lines,
    online (and no-KD fresh-view) students as bands of mean +- sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(g["regime"] for g in gs))
    fig, axes = plt.subplots(1, len(regimes), figsize=(7 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        plot_regime(ax, [g for g in gs if g["regime"] == regime])
        n = max(g["n"] for g in gs if g["regime"] == regime)
        ax.set_title(f"digits, {regime} (n={n} seeds)", fontsize=10)
    fig.suptitle("Cached vs online students")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_regime(ax, gs: list[dict]) -> None:
    colors = {"none": "tab:gray", "logits": "tab:blue", "spectral": "tab:red"}
    ks = sorted({g["views"] for g in gs if g["source"] == "cached"})
    for kind in KINDS:
        line = [g for g in gs if g["kind"] == kind and g["source"] == "cached"]
        if line:
            ax.errorbar([g["views"] for g in line], [g["mean"] for g in line], yerr=[g["sd"] for g in line],
                        marker="o", capsize=3, color=colors[kind], label=f"{LABEL[kind]}, cached")
        for g in gs:
            if g["kind"] == kind and g["source"] in ("online", "fresh"):
                what = "online teacher" if g["source"] == "online" else "fresh views"
                ax.axhspan(g["mean"] - g["sd"], g["mean"] + g["sd"], color=colors[kind], alpha=0.15)
                ax.axhline(g["mean"], color=colors[kind], ls="--", lw=1, label=f"{LABEL[kind]}, {what} (mean +- sd)")
            if g["kind"] == kind and g["source"] == "compact":
                ax.errorbar([g["views"] * 1.08], [g["mean"]], yerr=[g["sd"]], marker="s", capsize=3, ls="none",
                            color="black", label=f"{LABEL[kind]}, compact cache (pool 16 + int8)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("cached views per image (K')")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="work/study")
    ap.add_argument("--jobs", type=int, default=2, help="students trained at once (one core each)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--more-views", type=int, default=64,
                    help="also train cached SpectralKD at K' = 32, 64, ... up to this from a larger cache (0: off)")
    ap.add_argument("--reuse", default=None, help="a workdir whose teacher the study may use (default: work)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="a config override for every run (e.g. distill.defaults.epochs=2 for a quick check)")
    args = ap.parse_args()
    OVERRIDES.extend(args.overrides)
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    reuse = Path(args.reuse or ROOT / "work").resolve()
    lend = [reuse] if reuse.is_dir() else []
    confs = study_configs(root, args.seeds, args.more_views)
    upstream = {name: (lend if name == "main" else [root / "main", *lend]) for name in confs}
    source = {"main": "cached", "compact": "compact", "more": "cached", "full": "cached"}
    t0 = time.perf_counter()
    conf, wd = confs["main"], root / "main"
    walls = {"extract": run_pipeline(conf, wd, lend, "run", "extract"),
             "distill": run_pipeline(conf, wd, lend, "run", "distill", "--jobs", str(args.jobs)),
             "analyze": run_pipeline(conf, wd, lend, "run", "analyze")}
    for name in [n for n in confs if n != "main"]:
        walls[name] = run_pipeline(confs[name], root / name, upstream[name], "run", "analyze", "--jobs", str(args.jobs))
    total = time.perf_counter() - t0
    rows = [r for name in confs for r in students(confs[name], root / name, upstream[name], source[name])]
    gs = groups(rows)
    caches = {name: cache_bytes(confs[name], root / name, upstream[name]) for name in confs}
    text = [f"Machine: {machine()}", f"Study: {', '.join(p.name for p in confs.values())} in {root}, "
                                     f"{args.seeds} seeds", "",
            table(gs), sweep_walls([g for g in gs if g["regime"] == gs[0]["regime"]], caches["main"]), "",
            *(f"Cache '{name}': {c['bytes'] / 2**20:.1f} MiB, {c['views']} views per train image, "
              f"{c['bytes'] / c['rows']:.0f} B per row ({c['rows']} rows with val)" for name, c in caches.items()),
            f"Wall: study {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in walls.items())})"]
    report = "\n".join(text) + "\n"
    print("\n" + report)
    (root / "offline_vs_online.md").write_text(report)
    (root / "offline_vs_online.json").write_text(json.dumps({"students": rows, "groups": gs, "caches": caches,
                                                             "walls": walls}, indent=1))
    plot(gs, root / "offline_vs_online.png")
    print(f"wrote {root / 'offline_vs_online.md'}, .png, .json")


def sweep_walls(gs: list[dict], cache: dict) -> str:
    """Seconds of a whole sweep of seeds: online students, against extract + cached students on
    every view of the main cache."""
    lines = []
    for kind in ("logits", "spectral"):
        on = next((g for g in gs if g["kind"] == kind and g["source"] == "online"), None)
        top = next((g for g in gs if g["kind"] == kind and g["source"] == "cached" and g["views"] == cache["views"]),
                   None)
        if on is None or top is None:
            continue
        lines.append(f"{LABEL[kind]}, {on['n']} seeds: online {on['train_s_sum']:.0f} student-s; cached "
                     f"K'={top['views']} {top['train_s_sum']:.0f} student-s + extract {cache['wall_s']:.0f}s once "
                     f"for every student")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
