"""analyze's outputs for people: the figures across depth and of channel spectra, and ``report.md``."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TEACHER_NAME as TEACHER

from .dynamics import report_section, save_figure


def plot_across_depth(int_rows: list[dict], quantity: str, ylabel: str, title: str, path: Path) -> dict:
    """One of ``intensity.parquet``'s quantities against relative depth, one line per model (the
    teacher in bold); returns what the figure shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    by_model: dict[str, list[dict]] = {}
    for r in int_rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        rs = sorted(rs, key=lambda r: r["depth_frac"])
        style = dict(color="black", linewidth=2.5, marker="o") if model == TEACHER else dict(marker=".")
        ax.plot([r["depth_frac"] for r in rs], [r[quantity] for r in rs], label=model, **style)
    ax.set_xlabel("relative depth (layer / (depth - 1))")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    shown = {"legend": [t.get_text() for t in legend.get_texts()], "xlabel": ax.get_xlabel(),
             "ylabel": ax.get_ylabel(), "lines": {l.get_label(): len(l.get_xdata()) for l in ax.get_lines()}}
    plt.close(fig)
    return shown


def plot_channel_spectra(rows: list[dict], model: str, path: Path) -> None:
    """The channel spectrum S_l(f) of each of ``model``'s layers (``channel_spectra.parquet``'s rows),
    the non-redundant half of the frequencies, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    layers = sorted({r["layer"] for r in rows if r["model"] == model})
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        rs = sorted((r for r in rows if r["model"] == model and r["layer"] == layer), key=lambda r: r["frequency"])
        c = len(rs)
        half = rs[: c // 2 + 1]  # |FFT| of a real signal is symmetric
        ax.plot([r["frequency"] for r in half], [r["value"] for r in half], color=cmap(i / max(1, len(layers) - 1)),
                label=f"layer {layer}")
    ax.set_xlabel("channel frequency f")
    ax.set_ylabel("S_l(f)")
    ax.set_yscale("log")
    ax.set_title(f"Channel spectra per layer: {model}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def make_report(cfg, tables: dict, plots: list[str], n_rows: int, kinds: dict[str, str]) -> str:
    int_rows, prof_rows, pair_rows = tables["intensity"], tables["profile_distance"], tables["layer_pairs"]
    radial_rows = tables["radial_energy"]
    t_rows = sorted((r for r in int_rows if r["model"] == TEACHER), key=lambda r: r["layer"])
    top = sorted(t_rows, key=lambda r: -r["intensity"])[:3]
    lines = [
        "# Spectral analysis",
        "",
        f"Val split, {n_rows} rows. Teacher `{cfg.teacher.model}`; students: "
        + (", ".join(f"`{s.name}` ({s.loss.kind})" for s in cfg.distill.students) or "none") + ".",
        "",
        "![intensity across depth](intensity.png)",
        "",
        "## Where the teacher concentrates information",
        "",
        "Most information-rich teacher layers (highest intensity L): "
        + ", ".join(f"layer {r['layer']} (L = {r['intensity']:.4g})" for r in top) + ".",
        "",
        "| layer | intensity | low-band energy | high-band energy |",
        "|---|---|---|---|",
    ]
    bands = {}
    for r in radial_rows:
        if r["model"] == TEACHER:
            bands.setdefault(r["layer"], {})[r["band"]] = r["value"]
    for r in t_rows:
        b = bands.get(r["layer"], {})
        lo, hi = b.get(0, float("nan")), b.get(max(b) if b else 0, float("nan"))
        lines.append(f"| {r['layer']} | {r['intensity']:.4g} | {lo:.3f} | {hi:.3f} |")
    lines += ["", "## Do students mirror the teacher?", "",
              "Profile distance: mean |difference| between the student's intensity profile and the teacher's "
              "(each divided by its mean, teacher interpolated at the student's relative depths). Lower is closer.",
              "", "| student | kind | profile distance |", "|---|---|---|"]
    for r in sorted(prof_rows, key=lambda r: r["profile_distance"]):
        lines.append(f"| {r['model']} | {r['kind']} | {r['profile_distance']:.4f} |")
    none = [r for r in prof_rows if r["kind"] == "none"]
    kd = [r for r in prof_rows if r["kind"] != "none"]
    if none and kd:
        base = min(r["profile_distance"] for r in none)
        closer = [r["model"] for r in kd if r["profile_distance"] < base]
        lines += ["", f"Finding: {len(closer)} of {len(kd)} distilled students are closer to the teacher's profile "
                  f"than the closest no-KD student ({base:.4f})" + (f": {', '.join(closer)}." if closer else ".")]
    if pair_rows:
        lines += ["", "### Distilled layer pairs", "",
                  "| student | student layer | teacher layer | relative intensity distance | spectrum distance |",
                  "|---|---|---|---|---|"]
        for r in pair_rows:
            lines.append(f"| {r['model']} | {r['student_layer']} | {r['teacher_layer']} | "
                         f"{r['relative_intensity_distance']:.4f} | {r['spectrum_distance']:.4f} |")
    lines += [""] + report_section(tables["dynamics"], kinds)
    lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots]
    lines += ["", "Tables: intensity.parquet (with channel entropy), channel_spectra.parquet, radial_energy.parquet, "
              "profile_distance.parquet, layer_pairs.parquet, dynamics.parquet (long format).", ""]
    return "\n".join(lines)
