"""Distillation dynamics: how each student's layer statistics move toward the teacher's during training.

Distill records, at every ``snapshot_every`` epochs and the last, the analysis sums of every student
layer on the val split (``snapshots.parquet``, :func:`stages.spectral.layer_sums`: the same
per-block partial sums the Dask path of analyze computes, taken from the evaluation's forward pass,
so no weights or features are stored per snapshot).  This module turns them into, per student,
snapshot epoch and layer:

- intensity L = mean_f S(f) and the channel spectrum S(f) = mean_{b,h,w} |FFT_C(X)[f]| / C;
- radial spatial-frequency energy per band (fractions of the layer's energy);
- channel entropy (nats): per image and position, a 100-bin equal-width histogram of the position's
  C channel values between their own min and max, p_k = n_k / C, H = -sum_k p_k ln p_k, averaged;
- intensity relative to the teacher at the same relative depth, and the profile distance to the
  teacher (analyze's definition) per snapshot,

as the long table ``dynamics.parquet`` (student, kind, seed, epoch, layer, quantity, index, value),
pictures and the report's "Dynamics" section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cache.verify import DIGESTS, recorded_bytes
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write

from .spectral import band_energy, profile_distance

SNAPSHOTS = "snapshots.parquet"
SNAPSHOT_COLUMNS = {"epoch", "layer", "positions", "spectrum_sum", "entropy_sum", "grid_height", "width", "grid_energy"}


def snapshot_metrics(snap: dict, bands: int) -> dict:
    """Means of one snapshot record (a student layer at an epoch) from its sums."""
    n = max(1, snap["positions"])
    channel_spectrum = np.asarray(snap["spectrum_sum"], dtype=np.float64) / n
    grid = np.asarray(snap["grid_energy"], dtype=np.float64).reshape(snap["grid_height"], -1)
    energy = band_energy(grid, snap["grid_height"], snap["width"], bands)
    return {"spectrum": channel_spectrum, "intensity": float(channel_spectrum.mean()),
            "entropy": snap["entropy_sum"] / n,
            "radial": energy / max(energy.sum(), 1e-30)}


def student_dynamics(name: str, kind: str, seed: int, snapshots: list[dict], teacher: tuple[np.ndarray, np.ndarray],
                     bands: int) -> list[dict]:
    """Long-format rows of one student's snapshots; ``teacher`` is its (relative depths, intensities)."""
    depth = 1 + max(s["layer"] for s in snapshots)
    t_depth, t_val = teacher
    rows: list[dict] = []
    by_epoch: dict[int, list[tuple[int, dict]]] = {}
    for s in snapshots:
        by_epoch.setdefault(s["epoch"], []).append((s["layer"], snapshot_metrics(s, bands)))

    def put(epoch, layer, quantity, value, index=0):
        rows.append({"student": name, "kind": kind, "seed": seed, "epoch": epoch, "layer": layer,
                     "quantity": quantity, "index": index, "value": float(value)})

    for epoch, layers in sorted(by_epoch.items()):
        layers.sort(key=lambda t: t[0])
        frac = np.array([layer / max(1, depth - 1) for layer, _ in layers])
        inten = np.array([m["intensity"] for _, m in layers])
        t_at = np.interp(frac, t_depth, t_val)
        for (layer, m), rel in zip(layers, inten / np.maximum(t_at, 1e-30)):
            put(epoch, layer, "intensity", m["intensity"])
            put(epoch, layer, "intensity_rel_teacher", rel)
            put(epoch, layer, "entropy", m["entropy"])
            for f, v in enumerate(m["spectrum"]):
                put(epoch, layer, "channel_spectrum", v, f)
            for b, v in enumerate(m["radial"]):
                put(epoch, layer, "radial_energy", v, b)
        put(epoch, -1, "profile_distance", profile_distance(t_depth, t_val, frac, inten))
    return rows


def read_snapshots(rec) -> list[dict]:
    """The snapshot records of a student's record ``rec``: none when it keeps none (no sha256 of
    ``snapshots.parquet`` recorded), else the file's bytes checked against that sha256; a missing,
    changed or unreadable file is named."""
    if SNAPSHOTS not in (rec.summary.get(DIGESTS) or {}):
        return []
    path = Path(rec.path) / SNAPSHOTS
    data = recorded_bytes(rec, SNAPSHOTS)
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the snapshots ({e}); rerun the student with --force") from None
    if rows and not SNAPSHOT_COLUMNS <= set(rows[0]):
        raise PipelineError(f"{path}: not a snapshot table (columns {sorted(rows[0])})")
    return rows


def distance_curves(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """student -> (epochs, profile distance at each)."""
    out: dict[str, list] = {}
    for r in rows:
        if r["quantity"] == "profile_distance":
            out.setdefault(r["student"], []).append((r["epoch"], r["value"]))
    return {k: (np.array([e for e, _ in sorted(v)]), np.array([d for _, d in sorted(v)])) for k, v in out.items()}


def settle_epoch(epochs: np.ndarray, distance: np.ndarray, within: float = 0.10) -> int:
    """The first snapshot epoch (1-based) from which on the profile distance stays within
    ``within`` (relative) of its final value."""
    final = distance[-1]
    ok = np.abs(distance - final) <= within * abs(final)
    first = len(ok) - 1
    while first > 0 and ok[first - 1]:
        first -= 1
    return int(epochs[first]) + 1


def report_section(rows: list[dict], kinds: dict[str, str]) -> list[str]:
    """The report's "Dynamics" section (Markdown lines)."""
    curves = distance_curves(rows)
    if not curves:
        return ["## Dynamics", "", "No student recorded snapshots (`distill.defaults.snapshot_every: 0`).", ""]
    lines = ["## Dynamics", "",
             "Profile distance to the teacher at each snapshot ([dynamics_distance.png](dynamics_distance.png)); "
             "per student, layer x epoch intensity relative to the teacher at the same relative depth "
             "(`dynamics_<student>.png`); channel entropy per layer ([channel_entropy.png](channel_entropy.png)).",
             "",
             "Settling epoch: the first snapshot epoch from which the profile distance stays within 10% of its "
             "final value.", "",
             "| student | kind | snapshots | final distance | settling epoch |", "|---|---|---|---|---|"]
    settle = {}
    for name, (ep, d) in curves.items():
        settle[name] = settle_epoch(ep, d)
        lines.append(f"| {name} | {kinds.get(name, '?')} | {len(ep)} | {d[-1]:.4f} | {settle[name]} |")
    by_kind: dict[str, list[int]] = {}
    for name, e in settle.items():
        by_kind.setdefault(kinds.get(name, "?"), []).append(e)
    lines += ["", "| kind | n | settling epoch, mean | sd |", "|---|---|---|---|"]
    for kind, es in sorted(by_kind.items()):
        sd = f"{np.std(es, ddof=1):.1f}" if len(es) > 1 else "-"
        lines.append(f"| {kind} | {len(es)} | {np.mean(es):.1f} | {sd} |")
    if "none" in by_kind and any(k != "none" for k in by_kind):
        base = np.mean(by_kind["none"])
        earlier = sorted(k for k, es in by_kind.items() if k != "none" and np.mean(es) < base)
        lines += ["", f"Finding: distilled kinds settling earlier than no KD ({base:.1f}): "
                  + (", ".join(earlier) if earlier else "none") + ". With one run per kind this is a single "
                  "observation; a sweep over seeds gives the spread."]
    return lines + [""]


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a failed write names the file and the cause:
    :class:`pipeline.fsutil.WriteError`)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_dynamics(rows: list[dict], out: Path) -> list[str]:
    """One heatmap per student and the distance curves; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = distance_curves(rows)
    for name in curves:
        rel = [r for r in rows if r["student"] == name and r["quantity"] == "intensity_rel_teacher"]
        epochs = sorted({r["epoch"] for r in rel})
        layers = sorted({r["layer"] for r in rel})
        grid = np.full((len(layers), len(epochs)), np.nan)
        for r in rel:
            grid[layers.index(r["layer"]), epochs.index(r["epoch"])] = r["value"]
        fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=120)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_xticks(range(len(epochs)), [str(e + 1) for e in epochs])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("epoch")
        ax.set_ylabel("student layer")
        ax.set_title(f"{name}: intensity / teacher's at the same relative depth")
        fig.colorbar(im, ax=ax, label="ratio (1 = teacher)")
        fig.tight_layout()
        save_figure(fig, out / f"dynamics_{name}.png")
        plt.close(fig)
        written.append(f"dynamics_{name}.png")
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    for name, (ep, d) in curves.items():
        ax.plot(ep + 1, d, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("profile distance to the teacher")
    ax.set_title("How students' intensity profiles approach the teacher's")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "dynamics_distance.png")
    plt.close(fig)
    return written + ["dynamics_distance.png"]
