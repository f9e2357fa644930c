"""Students grouped by everything but their seed, and each group against its sweep's reference.

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

from pipeline.config import PipelineConfig, decisive


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
