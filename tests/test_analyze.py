"""analyze: Dask results equal float64 numpy, memory stays bounded, outputs are complete."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from stages.analyze import dask_channel_spectra, profile_distance, propose_layers


def _np_metrics(x: np.ndarray, bands: int):
    x = x.astype(np.float64)
    c = x.shape[1]
    spec = (np.abs(np.fft.fft(x, axis=1)) / c).mean(axis=(0, 2, 3))
    s = np.fft.rfft2(x, norm="ortho")
    e = (np.abs(s) ** 2).sum(axis=(0, 1))
    fy = np.fft.fftfreq(x.shape[2])[:, None]
    fx = np.fft.rfftfreq(x.shape[3])[None, :]
    r = np.sqrt(fy**2 + fx**2) / np.sqrt(0.5)
    idx = np.minimum((r * bands).astype(int), bands - 1)
    energy = np.array([e[idx == b].sum() for b in range(bands)])
    return spec, spec.mean(), energy / energy.sum()


def _np_entropy(x: np.ndarray) -> float:
    """Mean channel entropy by np.histogram, one position at a time (100 bins over the vector's range)."""
    x = x.astype(np.float64)
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        for h in range(x.shape[2]):
            for w in range(x.shape[3]):
                v = x[b, :, h, w]
                counts, _ = np.histogram(v, bins=100, range=(v.min(), v.max()) if v.max() > v.min() else None)
                p = counts[counts > 0] / len(v)
                total += float(-(p * np.log(p)).sum())
                n += 1
    return total / n


def test_dask_intensities_equal_numpy_float64(tmp_path):
    rng = np.random.default_rng(0)
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    arrays, raw = {}, {}
    for name, shape in (("a", (70, 12, 4, 4)), ("b", (70, 7, 5, 6))):
        x = rng.normal(size=shape).astype(np.float16)
        z = g.create_array(name, shape=shape, dtype="float16", chunks=(10, *shape[1:]), shards=(20, *shape[1:]))
        z[:] = x
        raw[name] = x
        arrays[name] = da.from_zarr(z, chunks=z.shards)
        assert arrays[name].numblocks[0] == 4
    got = dask_channel_spectra(arrays, bands=3, progress=False)
    for name, x in raw.items():
        spec, inten, energy = _np_metrics(x.astype(np.float64), 3)
        np.testing.assert_allclose(got[name][0], spec, rtol=1e-5)
        assert got[name][1] == pytest.approx(inten, rel=1e-5)
        np.testing.assert_allclose(got[name][2], energy, rtol=1e-4, atol=1e-7)
        assert got[name][3] == pytest.approx(_np_entropy(x), rel=1e-9)


def test_dask_path_is_chunked_and_memory_bounded(tmp_path):
    rows, shape = 2048, (64, 16, 16)  # 2048 x 64 x 16 x 16 float32 = 128 MiB
    limit = 40 * 2**20
    z = zarr.create_array(str(tmp_path / "big.zarr"), shape=(rows, *shape), dtype="float32",
                        chunks=(32, *shape), shards=(64, *shape))
    rng = np.random.default_rng(0)
    for a in range(0, rows, 64):
        z[a : a + 64] = rng.normal(size=(64, *shape)).astype(np.float32)
    total_bytes = rows * int(np.prod(shape)) * 4
    assert total_bytes >= 3 * limit
    arr = da.from_zarr(z, chunks=z.shards)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):
            got = dask_channel_spectra({"big": arr}, bands=4, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB: the array was not processed chunk by chunk"
    # and the answer is right: compare with numpy on a chunk-by-chunk float64 accumulation
    acc = np.zeros(64)
    for a in range(0, rows, 64):
        x = z[a : a + 64].astype(np.float64)
        acc += (np.abs(np.fft.fft(x, axis=1)) / 64).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(got["big"][0], acc / (rows * 16 * 16), rtol=1e-5)


def test_propose_layers():
    inten = [5.0, 1.0, 2.0, 0.5, 3.0, 4.0]
    assert propose_layers(inten, 3, "top", None) == [(0, 0), (4, 4), (5, 5)]
    assert propose_layers(inten, 4, "ends", 4) == [(0, 0), (1, 1), (2, 4), (3, 5)]
    pairs = propose_layers(inten, 2, "top", 3)
    assert [t for _, t in pairs] == [0, 5] and [s for s, _ in pairs] == [0, 2]
    # adjacent teacher layers on a shallow student still get distinct student layers
    assert propose_layers([0.1, 0.2, 0.9, 0.8], 2, "top", 2) == [(0, 2), (1, 3)]
    for k in range(1, 7):
        for sd in range(k, 9):
            ss = [s for s, _ in propose_layers(inten, k, "ends", sd)]
            assert ss == sorted(set(ss)) and 0 <= ss[0] and ss[-1] < sd


def test_profile_distance_zero_for_same_shape():
    d = np.linspace(0, 1, 5)
    v = np.array([3.0, 1.0, 1.0, 2.0, 4.0])
    assert profile_distance(d, v, d, 10 * v) == pytest.approx(0.0, abs=1e-12)
    assert profile_distance(d, v, d, v[::-1]) > 0.1


@pytest.mark.slow
def test_analyze_stage_outputs(built):
    cfg, runner, recs = built
    done = runner.run("analyze")
    rec = done["analyze"]
    out = Path(rec.path)
    t = pq.read_table(out / "intensity.parquet").to_pylist()
    models = {r["model"] for r in t}
    assert models == {"teacher", "none", "spectral"}
    assert sorted(r["layer"] for r in t if r["model"] == "teacher") == [0, 1, 2, 3]
    spectra = pq.read_table(out / "channel_spectra.parquet")
    assert spectra.column_names == ["model", "layer", "frequency", "value"]
    fig = rec.summary["intensity_figure"]
    assert set(fig["legend"]) == {"teacher", "none", "spectral"}
    assert fig["lines"]["teacher"] == 4 and fig["lines"]["spectral"] == 2
    assert fig["xlabel"] and fig["ylabel"]
    assert (out / "intensity.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "Most information-rich teacher layers" in report and "profile distance" in report
    pairs = pq.read_table(out / "layer_pairs.parquet").to_pylist()
    assert [(p["student_layer"], p["teacher_layer"]) for p in pairs] == [(0, 0), (1, 3)]
    # the teacher's cached layers came from the cache: inverse rfft2 of the stored spectra
    g = zarr.open_group(str(out / "features.zarr"), mode="r")
    assert g["teacher/blocks.0"].shape == (359, 32, 4, 4)
    # dynamics: the last epoch's snapshot (float32 features in distill) equals what analyze computed
    # from the final checkpoint (float16 features in features.zarr), layer by layer
    dyn = pq.read_table(out / "dynamics.parquet").to_pylist()
    assert {r["student"] for r in dyn} == {"none", "spectral"} and {r["epoch"] for r in dyn} == {0}
    for q in ("intensity", "entropy"):
        snap = {(r["student"], r["layer"]): r["value"] for r in dyn if r["quantity"] == q}
        final = {(r["model"], r["layer"]): r[q] for r in t if r["model"] != "teacher"}
        assert snap.keys() == final.keys()
        for k in snap:
            assert snap[k] == pytest.approx(final[k], rel=2e-3), (q, k)
    assert all(r["entropy"] > 0 for r in t)
    assert "## Dynamics" in report and "settling epoch" in report
    for png in ("dynamics_distance.png", "dynamics_none.png", "channel_entropy.png"):
        assert (out / png).stat().st_size > 10_000, png


@pytest.mark.slow
def test_select_layers_cli_prints_pairs(built, tmp_path, capsys):
    from tests.conftest import TINY, run_main, write_config

    cfg, runner, recs = built
    runner.run("analyze")
    conf = write_config(tmp_path / "p.yaml", TINY)
    r = run_main(capsys, "select-layers", "-c", str(conf), "--workdir", str(cfg.workdir), "--k", "2",
                 "--student-depth", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("pairs:")][0]
    t = pq.read_table(Path(runner.record("analyze").path) / "intensity.parquet").to_pylist()
    teacher = sorted((x for x in t if x["model"] == "teacher"), key=lambda x: -x["intensity"])
    top2 = sorted(x["layer"] for x in teacher[:2])
    assert line.startswith(f"pairs: [[0, {top2[0]}], [1, {top2[1]}]]")
