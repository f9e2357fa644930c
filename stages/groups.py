"""Students grouped by everything but their seed, each group against its sweep's reference, and the
distill summary table (:func:`summary_table`).

A group is the set of students whose training config (``pipeline.config.ResolvedStudent``,
decisive fields) differs only in name and seed.  For a group of a sweep with a ``reference``, the
paired difference to the reference group is taken over the seeds both have:
``d_s = top1(group, s) - top1(reference, s)``, reported as mean, sd, n and the 95% interval
``mean +- t(0.975, n - 1) * sd / sqrt(n)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.schema import decisive


@dataclass
class Group:
    label: str
    members: dict[int, str] = field(default_factory=dict)  # seed -> student name
    sweep: int | None = None
    values: dict = field(default_factory=dict)  # grid values without the seed


def group_key(cfg: PipelineConfig, name: str) -> str:
    d = decisive(cfg.student(name))
    d.pop("name", None)
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True)


def student_groups(cfg: PipelineConfig) -> list[Group]:
    """The config's students grouped by everything but the seed, in config order."""
    runs = cfg.distill.sweep_runs()
    groups: dict[str, Group] = {}
    for s in cfg.distill.students:
        key = group_key(cfg, s.name)
        sweep, values = runs.get(s.name, (None, {}))
        values = {k: v for k, v in values.items() if k != "seed"}
        if key not in groups:
            if sweep is not None:
                base = cfg.distill.sweep[sweep].base["name"]
                label = "-".join([base, *(f"{k.split('.')[-1]}={v}" for k, v in values.items())])
            else:
                label = s.name
            groups[key] = Group(label, sweep=sweep, values=values)
        groups[key].members[cfg.student(s.name).seed] = s.name
    return list(groups.values())


def reference_of(cfg: PipelineConfig, g: Group, groups: list[Group]) -> Group | None:
    """The group ``g`` is compared with: in its sweep, its own values with the reference's applied."""
    if g.sweep is None or not cfg.distill.sweep[g.sweep].reference:
        return None
    want = {**g.values, **cfg.distill.sweep[g.sweep].reference}
    return next((r for r in groups if r.sweep == g.sweep and r.values == want), None)


def t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean, sd, n and 95% interval of a[s] - b[s] over the seeds both have (interval needs n >= 2)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan, "sd": float(d.std(ddof=1)) if n > 1 else math.nan}
    half = t975(n - 1) * out["sd"] / math.sqrt(n) if n > 1 else math.nan
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def group_rows(cfg: PipelineConfig, top1: dict[str, float]) -> list[dict]:
    """One row per group: n, mean and sd of val top-1, and the paired difference to its reference."""
    groups = student_groups(cfg)
    rows = []
    for g in groups:
        acc = {seed: top1[name] for seed, name in g.members.items()}
        vals = np.array(list(acc.values()), dtype=np.float64)
        row = {"group": g.label, "n": len(vals), "seeds": sorted(acc), "mean": float(vals.mean()),
               "sd": float(vals.std(ddof=1)) if len(vals) > 1 else math.nan, "reference": None}
        ref = reference_of(cfg, g, groups)
        if ref is not None and ref is not g:
            racc = {seed: top1[name] for seed, name in ref.members.items()}
            row["reference"] = ref.label
            row.update({f"diff_{k}": v for k, v in paired_difference(acc, racc).items()})
        rows.append(row)
    return rows


def groups_markdown(rows: list[dict]) -> str:
    lines = ["| group | n | val top-1 mean +- sd | paired difference to reference (95% interval) | reference |",
             "|---|---|---|---|---|"]
    for r in rows:
        sd = f" +- {r['sd']:.2f}" if not math.isnan(r["sd"]) else ""
        if r["reference"] is None:
            diff = "-"
        elif r.get("diff_n", 0) > 1:
            diff = f"{r['diff_mean']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}] (n={r['diff_n']})"
        else:
            diff = f"{r.get('diff_mean', math.nan):+.2f} (n={r.get('diff_n', 0)}, no interval)"
        lines.append(f"| {r['group']} | {r['n']} | {r['mean']:.2f}{sd} | {diff} | {r['reference'] or '-'} |")
    return "\n".join(lines) + "\n"


def summary_table(teacher_summary: dict, cfg: PipelineConfig, rows: list[dict]) -> tuple[pa.Table, str]:
    """Every run (teacher first) as a table with its seed group, and the markdown summary: the runs,
    then, when some runs differ only by seed, their groups with mean, sd, n and paired differences."""
    label = {name: g.label for g in student_groups(cfg) for name in g.members.values()}
    all_rows = [{"model": f"teacher ({cfg.teacher.model})", "kind": "teacher", "mode": "-", "group": "teacher",
                 "seed": None, "val_top1": teacher_summary.get("val_top1"),
                 "val_top5": teacher_summary.get("val_top5"), "params": teacher_summary.get("params")}]
    for r in rows:
        all_rows.append({"model": r["student"], "kind": r["kind"], "mode": r["mode"], "group": label[r["student"]],
                         "seed": r["seed"], "val_top1": r["val_top1"], "val_top5": r["val_top5"],
                         "params": r["params"]})
    table = pa.Table.from_pylist(all_rows)
    md = ["| model | kind | mode | seed | val top-1 | val top-5 | params |", "|---|---|---|---|---|---|---|"]
    for r in all_rows:
        t1 = f"{r['val_top1']:.2f}" if r["val_top1"] is not None else "-"
        t5 = f"{r['val_top5']:.2f}" if r["val_top5"] is not None else "-"
        seed = r["seed"] if r["seed"] is not None else "-"
        md.append(f"| {r['model']} | {r['kind']} | {r['mode']} | {seed} | {t1} | {t5} | {r['params'] or '-'} |")
    text = "\n".join(md) + "\n"
    groups = group_rows(cfg, {r["student"]: r["val_top1"] for r in rows})
    if cfg.distill.sweep or any(g["n"] > 1 for g in groups):
        text += "\nRuns that differ only by seed, grouped:\n\n" + groups_markdown(groups)
    return table, text
