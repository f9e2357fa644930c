"""analyze: where each model concentrates information, and whether students mirror their teacher.

1. Features on the val split, written to ``features.zarr/<model>/<layer>`` (rows, C, H, W),
   sharded like the cache: the teacher's cached layers come from the cache (stored features, or
   the inverse rfft2 of the stored spectra), its other layers and every student's layers from a
   forward pass over the val views.
2. On Dask (chunks = shards, per-chunk FFTs and partial sums, never a whole-array load), per model
   and layer: the channel spectrum S_l(f) = mean_{b,h,w} |FFT_C(X)[f]| / C, the intensity
   L = mean_f S_l(f), and the spatial-frequency energy per radial band of the rfft2 grid.
3. Tables (Parquet, long format), plots (PNG) and a Markdown report with the findings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from cache.features import FeatureStore, store_digests, store_problems
from cache.reader import open_cache
from cache.verify import DIGESTS, digest_problems, file_digests, recorded_bytes, required_record
from pipeline.config import TEACHER_NAME, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write, atomic_write_text
from pipeline.nodes import student_node

from . import models
from .data import ViewDataset, sequential_batches, view_loader
from .dynamics import plot_dynamics, read_snapshots, student_dynamics
from .report import make_report, plot_across_depth, plot_channel_spectra
from .spectral import (channel_entropy_sum, channel_spectrum_sum, profile_distance,  # noqa: F401
                       radial_energy_sum)

log = logging.getLogger("pipeline")

TEACHER = TEACHER_NAME
FEATURES = "features.zarr"
FEATURE_DIGESTS = "features_sha256"  # the record's summary key: features.zarr's node -> sha256 (store_digests)
TABLES = ("intensity", "channel_spectra", "radial_energy", "profile_distance", "layer_pairs", "dynamics")
REPORT = "report.md"


# ----------------------------------------------------------------------------- dask metrics


def _metrics_block(block: np.ndarray, bands: int) -> np.ndarray:
    """One chunk -> (1, C + bands + 1): channel-spectrum sums, radial energy sums, channel-entropy sum
    (one read per chunk)."""
    return np.concatenate([channel_spectrum_sum(block), radial_energy_sum(block, bands),
                           [channel_entropy_sum(block)]])[None, :]


def layer_metrics(arr, bands: int):
    """Lazy per-layer sums of one (rows, C, H, W) dask array chunked along rows only.

    Returns (sums (C + bands + 1,), number of (b, h, w) positions); every task reads one chunk.
    """
    c = arr.shape[1]
    per_chunk = arr.map_blocks(_metrics_block, bands, drop_axis=[2, 3],
                               chunks=((1,) * arr.numblocks[0], (c + bands + 1,)), dtype=np.float64)
    return per_chunk.sum(axis=0), arr.shape[0] * arr.shape[2] * arr.shape[3]


def dask_channel_spectra(arrays: dict, bands: int, progress: bool = True, client=None) -> dict:
    """{key: dask array} -> {key: (channel spectrum (C,), intensity, radial energy fractions (bands,),
    mean channel entropy)}."""
    import dask

    lazy = {k: layer_metrics(a, bands) for k, a in arrays.items()}
    flat = [sums for sums, _ in lazy.values()]
    if client is not None:
        from distributed import as_completed

        futures = client.compute(flat)
        for _ in tqdm(as_completed(futures), total=len(futures), desc="analyze", disable=not progress or None):
            pass
        values = client.gather(futures)
    else:
        values = dask.compute(*flat)
    out = {}
    for (k, (_, positions)), sums in zip(lazy.items(), values):
        c = arrays[k].shape[1]
        channel_spectrum = np.asarray(sums[:c]) / positions
        energy = np.asarray(sums[c:-1])
        out[k] = (channel_spectrum, float(channel_spectrum.mean()), energy / max(energy.sum(), 1e-30),
                  float(sums[-1]) / positions)
    return out


# ----------------------------------------------------------------------------- features


@torch.inference_mode()
def write_model_features(store: FeatureStore, label: str, model, indices: list[int], names: list[str],
                         dataset: ViewDataset, rows: tuple[int, int], rows_per_shard: int, batch: int, device,
                         valid: np.ndarray) -> None:
    """Run ``model`` on val rows and write its layers, one shard of rows at a time (a row whose
    image extract read, ``valid``, must still be readable)."""
    model = model.to(device).eval()
    a0, b0 = rows
    n = b0 - a0
    x0 = dataset.normalize(dataset[a0][0][None].to(device), [a0])
    _, f0 = models.intermediates(model, x0, indices)
    arrays = [store.new_array(label, nm, n, tuple(f.shape[1:]), rows_per_shard) for nm, f in zip(names, f0)]
    for s in tqdm(range(0, n, rows_per_shard), desc=f"features {label}", leave=False, disable=None):
        e = min(n, s + rows_per_shard)
        bufs = [np.zeros((e - s, *a.shape[1:]), np.float16) for a in arrays]
        for x, _, ok, idx in view_loader(dataset, sequential_batches(range(a0 + s, a0 + e), batch)):
            rows_here = idx.numpy()
            dataset.require_readable(rows_here, ok.numpy(), valid[rows_here])
            _, feats = models.intermediates(model, dataset.normalize(x.to(device), rows_here), indices)
            for buf, f in zip(bufs, feats):
                buf[rows_here - a0 - s] = f.float().cpu().numpy().astype(np.float16)
        for arr, buf in zip(arrays, bufs):
            store.write_shard(arr, s // rows_per_shard, buf)


def write_cached_teacher_layers(store: FeatureStore, cache, rows: tuple[int, int], rows_per_shard: int) -> list[int]:
    """The teacher's cached layers on val rows: stored features, else irfft2 of the stored spectra
    where they are lossless (a pooled or quantized layer is left to the teacher's forward pass)."""
    a0, b0 = rows
    n = b0 - a0
    done = []
    for layer in cache.spec.layers:
        if "features" not in cache.spec.store and not cache.spec.lossless(layer):
            continue
        arr = store.new_array(TEACHER, layer.name, n, layer.feature_shape(), rows_per_shard)
        for s in range(0, n, rows_per_shard):
            e = min(n, s + rows_per_shard)
            block = cache.read_layer("features", layer.index, a0 + s, a0 + e)  # stored, or irfft2 of the spectra
            store.write_shard(arr, s // rows_per_shard, block.astype(np.float16, copy=False))
        done.append(layer.index)
    return done


# ----------------------------------------------------------------------------- outputs


def _write_table(path: Path, rows: list[dict]) -> None:
    t = pa.Table.from_pylist(rows)
    atomic_write(path, lambda f: pq.write_table(t, f))


def _read_recorded_table(rec, name: str) -> pa.Table:
    """A table of analyze's record ``rec``, its bytes checked against the recorded sha256."""
    try:
        return pq.read_table(pa.BufferReader(recorded_bytes(rec, name)))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{Path(rec.path) / name}: cannot read the table ({e}); rerun analyze --force") from None


def spectrum_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance of two channel spectra, each normalized to sum 1, on a common relative-frequency grid."""
    grid = np.linspace(0, 1, 64)
    fa = np.interp(grid, np.linspace(0, 1, len(a)), a / max(a.sum(), 1e-30) * len(a))
    fb = np.interp(grid, np.linspace(0, 1, len(b)), b / max(b.sum(), 1e-30) * len(b))
    return float(np.sqrt(np.mean((fa - fb) ** 2)))


# ----------------------------------------------------------------------------- stage


def local_cluster(workers: int, threads_per_worker: int = 1, memory_limit: str | int = "auto"):
    """A LocalCluster of worker processes tuned for chunked FFT work.

    distributed's nanny sets MALLOC_TRIM_THRESHOLD_ in workers, which turns off glibc's adaptive
    mmap threshold: every multi-megabyte FFT temporary is then a fresh mmap with page faults, and
    the same per-chunk work ran 2.5x slower in a worker than in the client process here.  The
    thread caps are kept.
    """
    import dask
    from distributed import LocalCluster

    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                            processes=True, dashboard_address=None)


def _client(cfg: PipelineConfig):
    from distributed import Client

    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    a = cfg.analyze
    if a.scheduler:
        try:
            return Client(a.scheduler, timeout="20s"), None
        except OSError as e:
            raise PipelineError(f"analyze.scheduler: cannot reach {a.scheduler} ({e})") from None
    cluster = local_cluster(a.workers, a.threads_per_worker, a.memory_limit)
    return Client(cluster), cluster


def run(ctx) -> dict:
    """Features of every model on the val split, their metrics on Dask, then tables, plots, report."""
    cfg: PipelineConfig = ctx.cfg
    t0 = time.time()
    cache = open_cache(ctx.upstream["extract"])
    vb = cache.block("val", 0)
    rows = (vb.start, vb.stop if cfg.analyze.max_rows is None else min(vb.stop, vb.start + cfg.analyze.max_rows))
    models_seen = write_features(ctx, cache, rows)
    metrics = compute_metrics(cfg, Path(ctx.out) / FEATURES, models_seen.layer_index)
    tables = metric_tables(cfg, metrics, models_seen, _snapshots(ctx.runner))
    out = Path(ctx.out)
    written = [f"{name}.parquet" for name in TABLES if tables[name]]
    for name in TABLES:
        if tables[name]:
            _write_table(out / f"{name}.parquet", tables[name])
    figure = plot_across_depth(tables["intensity"], "intensity", "intensity L(X) = mean_f |FFT_C(X)| / C",
                               "Channel-spectrum intensity across depth (val split)", out / "intensity.png")
    plot_across_depth(tables["intensity"], "entropy", "channel entropy (nats, 100 bins)",
                      "Channel entropy across depth (val split, final models)", out / "channel_entropy.png")
    plots = ["intensity.png", "channel_entropy.png"]
    for model in models_seen.layer_index:
        plot_channel_spectra(tables["channel_spectra"], model, out / f"channel_spectra_{model}.png")
        plots.append(f"channel_spectra_{model}.png")
    if tables["dynamics"]:
        plots += plot_dynamics(tables["dynamics"], out)
    report = make_report(cfg, tables, plots, rows[1] - rows[0], models_seen.kinds)
    atomic_write_text(out / REPORT, report)
    log.info(f"analyze: report at {out / REPORT}")
    t_rows = sorted((r for r in tables["intensity"] if r["model"] == TEACHER), key=lambda r: r["layer"])
    return {"models": list(models_seen.layer_index), "val_rows": rows[1] - rows[0],
            "seconds": round(time.time() - t0, 1),
            "profile_distance": {r["model"]: r["profile_distance"] for r in tables["profile_distance"]},
            "top_teacher_layers": top_layers(t_rows, 3), "intensity_figure": figure,
            DIGESTS: file_digests(out, [*written, *plots, REPORT]), FEATURE_DIGESTS: store_digests(out / FEATURES)}


def output_problems(runner, out: Path, lock: dict) -> list[str]:
    """What is wrong with analyze's output ``out`` now: a table, plot or the report missing or not
    the bytes its record's sha256 says, or ``features.zarr`` not as analyze wrote it
    (:func:`cache.features.store_problems`)."""
    summary = lock.get("summary", {})
    problems = digest_problems(out, summary, ("intensity.parquet", REPORT))
    if FEATURE_DIGESTS not in summary:
        return problems + [f"{out / 'lock.json'}: records no digest of {FEATURES} (written by an older version); "
                           f"the next run rebuilds it"]
    return problems + store_problems(out / FEATURES, summary[FEATURE_DIGESTS])


@dataclass
class ModelsSeen:
    """What :func:`write_features` wrote: per model its layers (name -> index), depth, kind and
    distilled layer pairs, and each student's seed."""

    layer_index: dict[str, dict[str, int]] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    pairs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)


def write_features(ctx, cache, rows: tuple[int, int]) -> ModelsSeen:
    """``features.zarr/<model>/<layer>`` on val rows: the teacher's cached layers from the cache, its
    other layers (``analyze.teacher_all_layers``) and every student's from a forward pass."""
    cfg = ctx.cfg
    a = cfg.analyze
    rows_per_shard = cache.spec.rows_per_shard
    dataset = ViewDataset.for_config(cache.rows(), cfg.data)
    device = models.resolve_device(cfg.teacher.device)
    store = FeatureStore.create(Path(ctx.out) / FEATURES)
    seen = ModelsSeen()
    teacher = models.load_teacher(ctx.upstream["teacher"], cfg)
    tdepth = models.depth(teacher)
    cached = write_cached_teacher_layers(store, cache, rows, rows_per_shard)
    seen.layer_index[TEACHER] = {layer.name: layer.index for layer in cache.spec.layers}
    wanted = range(tdepth) if a.teacher_all_layers else [layer.index for layer in cache.spec.layers]
    rest = [i for i in wanted if i not in cached]
    if rest:
        names = models.layer_names(teacher, rest)
        write_model_features(store, TEACHER, teacher, rest, names,
                             dataset.normalized_as(models.teacher_normalization(cfg)), rows, rows_per_shard,
                             a.batch_size, device, cache.valid)
        seen.layer_index[TEACHER].update(dict(zip(names, rest)))
    seen.depths[TEACHER], seen.kinds[TEACHER] = tdepth, "teacher"
    for s in cfg.distill.students:
        st = cfg.student(s.name)
        m = models.load_student(ctx.runner, cfg, s.name)
        d = models.depth(m)
        names = models.layer_names(m, list(range(d)))
        write_model_features(store, s.name, m, list(range(d)), names, dataset, rows, rows_per_shard, a.batch_size,
                             device, cache.valid)
        seen.layer_index[s.name] = dict(zip(names, range(d)))
        seen.depths[s.name], seen.kinds[s.name], seen.seeds[s.name] = d, st.loss.kind, st.seed
        seen.pairs[s.name] = list(ctx.runner.model_plan.pairs[s.name])
    return seen


def compute_metrics(cfg: PipelineConfig, store: Path, layer_index: dict) -> dict:
    """The metrics of every (model, layer) of the feature store, on Dask with chunks = shards."""
    features = FeatureStore(store)
    arrays = {(model, idx): features.dask_array(model, name)
              for model, names in layer_index.items() for name, idx in names.items()}
    client, cluster = _client(cfg)
    try:
        return dask_channel_spectra(arrays, cfg.analyze.radial_bands, client=client)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def metric_tables(cfg: PipelineConfig, metrics: dict, seen: ModelsSeen,
                  snapshots: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Long-format rows of every table analyze writes (``snapshots``: each student's records)."""
    spectra_rows, int_rows, radial_rows = [], [], []
    for (model, idx), (channel_spectrum, inten, radial, entropy) in sorted(metrics.items()):
        frac = idx / max(1, seen.depths[model] - 1)
        int_rows.append({"model": model, "kind": seen.kinds[model], "layer": idx, "depth_frac": frac,
                         "intensity": inten, "entropy": entropy})
        spectra_rows += [{"model": model, "layer": idx, "frequency": f, "value": float(v)}
                         for f, v in enumerate(channel_spectrum)]
        radial_rows += [{"model": model, "layer": idx, "band": b, "value": float(v)} for b, v in enumerate(radial)]
    t_rows = sorted((r for r in int_rows if r["model"] == TEACHER), key=lambda r: r["layer"])
    teacher = (np.array([r["depth_frac"] for r in t_rows]), np.array([r["intensity"] for r in t_rows]))
    prof_rows, pair_rows, dyn_rows = [], [], []
    for s in cfg.distill.students:
        s_rows = sorted((r for r in int_rows if r["model"] == s.name), key=lambda r: r["layer"])
        prof_rows.append({
            "model": s.name, "kind": seen.kinds[s.name],
            "profile_distance": profile_distance(*teacher, np.array([r["depth_frac"] for r in s_rows]),
                                                 np.array([r["intensity"] for r in s_rows])),
        })
        pair_rows += _pair_rows(s.name, seen.pairs[s.name], metrics)
    for name, snaps in snapshots.items():
        dyn_rows += student_dynamics(name, seen.kinds[name], seen.seeds[name], snaps, teacher,
                                     cfg.analyze.radial_bands)
    return {"intensity": int_rows, "channel_spectra": spectra_rows, "radial_energy": radial_rows,
            "profile_distance": prof_rows, "layer_pairs": pair_rows, "dynamics": dyn_rows}


def _pair_rows(name: str, pairs: list[tuple[int, int]], metrics: dict) -> list[dict]:
    out = []
    for sl, tl in pairs:
        if (TEACHER, tl) not in metrics:
            continue
        ts, tl_int = metrics[(TEACHER, tl)][:2]
        ss, sl_int = metrics[(name, sl)][:2]
        out.append({"model": name, "student_layer": sl, "teacher_layer": tl,
                    "intensity_distance": abs(tl_int - sl_int),
                    "relative_intensity_distance": abs(tl_int - sl_int) / max(tl_int, 1e-30),
                    "spectrum_distance": spectrum_distance(ts, ss)})
    return out


def _snapshots(runner) -> dict[str, list[dict]]:
    """Each student's snapshot records (distill's ``snapshots.parquet``, checked against the sha256
    its record holds), where it keeps any."""
    out = {}
    for s in runner.cfg.distill.students:
        snaps = read_snapshots(required_record(runner, student_node(s.name)))
        if snaps:
            out[s.name] = snaps
    return out


def top_layers(teacher_rows: list[dict], k: int) -> list[int]:
    return [r["layer"] for r in sorted(teacher_rows, key=lambda r: -r["intensity"])[:k]]


# ----------------------------------------------------------------------------- select-layers


def propose_layers(intensities: list[float], k: int, method: str, student_depth: int | None) -> list[tuple[int, int]]:
    """Teacher layers to distill from, paired with student layers.

    top: the k layers of highest intensity; ends: the first ceil(k/2) and last floor(k/2) layers.
    Student layers: the teacher layer's relative depth mapped onto the student, made distinct and
    increasing where the student has enough layers.
    """
    d = len(intensities)
    k = max(1, min(k, d))
    if method == "top":
        chosen = sorted(int(i) for i in np.argsort(-np.asarray(intensities), kind="stable")[:k])
    else:
        first = (k + 1) // 2
        chosen = sorted(set(list(range(first)) + list(range(d - (k - first), d))))
    sd = student_depth or d
    ideal = [int(round(t * (sd - 1) / max(1, d - 1))) for t in chosen]
    s = list(ideal)
    if len(s) <= sd:  # distinct, increasing student layers, as close to the ideal as they fit
        for i in range(1, len(s)):
            s[i] = max(s[i], s[i - 1] + 1)
        for i in reversed(range(len(s))):
            s[i] = min(s[i], sd - len(s) + i)
            if i + 1 < len(s):
                s[i] = min(s[i], s[i + 1] - 1)
    return list(zip(s, chosen))


def select_layers_cli(runner, k: int, method: str, student_depth: int | None) -> str:
    if runner.record("analyze") is None:
        runner.run("analyze")
    rec = required_record(runner, "analyze")
    t = _read_recorded_table(rec, "intensity.parquet").to_pylist()
    t_rows = sorted((r for r in t if r["model"] == TEACHER), key=lambda r: r["layer"])
    vals = [r["intensity"] for r in t_rows]
    pairs = propose_layers(vals, k, method, student_depth)
    prof = ", ".join(f"{r['layer']}:{r['intensity']:.3g}" for r in t_rows)
    return (f"# teacher intensity by layer: {prof}\n# method {method}, k={k}\n"
            f"pairs: [{', '.join(f'[{s}, {t}]' for s, t in pairs)}]   # [student_layer, teacher_layer]")
