"""extract: replayable views, plain Zarr/Dask access, resume after SIGKILL, torchrun ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from stages import models
from stages.data import ImageReader, Rows, ViewDataset, build_view, decode_image, view_pixels
from cache.codec import hermitian_maps
from cache.reader import cache_path, open_cache
from stages.shards import Sample, Samples
from pipeline.config import config_from_dict
from pipeline.graph import Runner
from tests.conftest import ROOT, TINY, assert_reproduces_cached_targets, copy_upstream, tiny_tree, write_config


def test_replay_reproduces_cached_targets(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    teacher = models.load_teacher(recs["teacher"], cfg)
    rows = cache.rows()
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(cache.spec.rows, 24, replace=False))
    reader = ImageReader()
    src = {r: rows.source(r) for r in pick}
    x = torch.stack([
        build_view(decode_image(reader.read(src[r].url, src[r].offset, src[r].size)), rows.view_params(r),
                   cfg.data.image_size, cfg.data.mean, cfg.data.std)
        for r in pick
    ])
    with torch.inference_mode():
        logits, feats = models.intermediates(teacher, x, cfg.extract.layers)
    assert_reproduces_cached_targets(cache, pick, logits, feats)
    # train views differ between views of a sample; val rows are the plain view
    m = cache.manifest.to_pydict()
    train0 = [i for i in range(cache.spec.rows) if m["split"][i] == "train" and m["view"][i] == 0][:50]
    assert any(m["crop_height"][i] < 1.0 for i in train0)
    val = [i for i in range(cache.spec.rows) if m["split"][i] == "val"]
    assert all(m["crop_height"][i] == 1.0 and not m["flip"][i] for i in val)


def test_cache_opens_with_plain_zarr_and_dask(built):
    cfg, runner, recs = built
    path = cache_path(recs["extract"])
    g = zarr.open_group(str(path), mode="r")
    rows = g.attrs["spec"]["rows"]
    assert rows == 2 * 1438 + 359
    assert g["logits"].shape == (rows, 10) and g["logits"].dtype == np.float16
    names = [l["name"] for l in g.attrs["layers"]]
    assert names == ["blocks.0", "blocks.3"]
    cache = open_cache(recs["extract"])
    for n, layer in zip(names, cache.spec.layers):
        a = g[f"spectra/{n}"]  # Hermitian-packed: the 16 free numbers of each 4 x 3 x 2 half-spectrum
        assert a.shape == (rows, 32, 16) and a.dtype == np.float16
        dense = cache.read_layer("spectra", layer.index, 0, 5)
        assert dense.shape == (5, 32, 4, 3, 2)
        keep, _, _ = hermitian_maps(4, 4)
        np.testing.assert_array_equal(a[:5], dense.reshape(5, 32, -1)[..., keep])
        assert a.shards[0] == cfg.extract.rows_per_shard
        d = da.from_zarr(a, chunks=a.shards)
        assert d.chunks[0][0] == cfg.extract.rows_per_shard
        assert np.isfinite(d[:300].astype(np.float32).sum().compute())
    assert g.attrs["fingerprint"] == recs["extract"].lock["fingerprint"]
    assert g.attrs["teacher"]["weights_sha256"] == recs["teacher"].summary["weights_sha256"]
    assert g.attrs["complete"] is True


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    out = {"logits": g["logits"][:], "valid": g["valid"][:]}
    for l in g.attrs["layers"]:
        out[l["name"]] = g[f"spectra/{l['name']}"][:]
    return out


def _extract_one_thread(tree: dict, wd: Path) -> Path:
    """Extract ``tree`` into ``wd`` in this process with one torch thread, as each extract process
    below runs (OMP_NUM_THREADS=1): the reference its caches must equal bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(Runner(config_from_dict(tree, workdir=str(wd))).run("extract")["extract"].path) / "cache.zarr"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(built, tmp_path):
    cfg, runner, recs = built
    conf = write_config(tmp_path / "p.yaml", tiny_tree(**{"extract.batch_size": 16}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # the uninterrupted reference
    ref = _arrays(_extract_one_thread(tiny_tree(**{"extract.batch_size": 16}),
                                      copy_upstream(recs, tmp_path / "ref", ("prepare", "teacher"))))
    wd = copy_upstream(recs, tmp_path / "w", ("prepare", "teacher"))
    cmd = [sys.executable, "-m", "pipeline", "run", "extract", "-c", str(conf), "--workdir", str(wd)]
    rng = np.random.default_rng(int(time.time()))
    marker_dir = None
    for attempt in range(2):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until some (but not all) shards are complete, then SIGKILL
        deadline = time.time() + 120
        want = int(rng.integers(2, 8)) + attempt * 3
        while time.time() < deadline and p.poll() is None:
            found = list(wd.glob("extract/*/cache.zarr/_complete/*.json"))
            if len(found) >= want:
                marker_dir = found[0].parent
                break
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert marker_dir is not None, "extract finished or never started before the kill"
    done_before = {m.name: m.stat().st_mtime_ns for m in marker_dir.glob("*.json")}
    shard_files = {}
    cache_dir = marker_dir.parent
    for m in done_before:
        s = int(m.split(".")[0])
        f = cache_dir / "logits" / "c" / str(s) / "0"
        shard_files[f] = (f.stat().st_mtime_ns, f.stat().st_ino)
    assert 0 < len(done_before) < 13
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr
    # completed shards were not rewritten
    for m, t in done_before.items():
        assert (marker_dir / m).stat().st_mtime_ns == t
    for f, (t, ino) in shard_files.items():
        assert (f.stat().st_mtime_ns, f.stat().st_ino) == (t, ino)
    assert not list(cache_dir.rglob("*.tmp")), "a shard write cut short leaves no temporary file behind"
    got = _arrays(cache_dir)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(built, tmp_path):
    cfg, runner, recs = built
    conf = write_config(tmp_path / "p.yaml", TINY)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # the 1-process reference with the same per-process thread count as each rank
    ref = _arrays(_extract_one_thread(TINY, copy_upstream(recs, tmp_path / "ref", ("prepare", "teacher"))))
    wd = copy_upstream(recs, tmp_path / "w", ("prepare", "teacher"))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "pipeline", "run", "extract", "-c", str(conf), "--workdir", str(wd)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    caches = list(wd.glob("extract/*/cache.zarr"))
    assert len(caches) == 1
    got = _arrays(caches[0])
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    g = zarr.open_group(str(caches[0]), mode="r")
    assert g.attrs["complete"] is True


def test_batched_views_and_decoded_image_cache_equal_one_view_at_a_time(built, tmp_path):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    rows = cache.rows()
    keys = cache.manifest.column("key").to_pylist()
    first = {}
    pairs = []  # (view 0 row, view 1 row) of the same sample
    for r, k in enumerate(keys):
        if k in first and len(pairs) < 20:
            pairs.append((first[k], r))
        first.setdefault(k, r)
    idx = [a for a, _ in pairs] + [b for _, b in pairs]
    reader = ImageReader()
    src = {r: rows.source(r) for r in idx}
    ref = torch.stack([view_pixels(decode_image(reader.read(src[r].url, src[r].offset, src[r].size)),
                                   rows.view_params(r), cfg.data.image_size) for r in idx])
    plain = ViewDataset(rows, cfg.data.image_size, cfg.data.mean, cfg.data.std, cache_mb=0)
    kept = ViewDataset(rows, cfg.data.image_size, cfg.data.mean, cfg.data.std, cache_mb=1)
    for ds in (plain, kept, kept):  # the second pass of `kept` is served from decoded images
        x, y, ok, got_idx = ds.batch(idx)
        assert torch.equal(x, ref)
        assert ok.all() and got_idx.tolist() == idx
        assert y.tolist() == [src[r].label for r in idx]
    assert len(plain._images) == 0 and len(kept._images) == len(pairs)
    # the budget bounds the cache: room for one 16x16 RGB image (768 bytes + 1 KiB overhead)
    small = ViewDataset(rows, cfg.data.image_size, cfg.data.mean, cfg.data.std, cache_mb=3000 / 2**20)
    assert torch.equal(small.batch(idx)[0], ref) and len(small._images) == 1
    # an image that cannot be decoded is reported, never cached, and leaves its neighbours intact
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an image at all")
    first = src[idx[0]]
    two = Samples.of([first, Sample("junk", 3, str(junk), 0, junk.stat().st_size)])
    params = {f: np.repeat(c[idx[0] : idx[0] + 1], 2) for f, c in rows.params.items()}
    ds = ViewDataset(Rows(two, np.arange(2), params), cfg.data.image_size, cfg.data.mean, cfg.data.std, cache_mb=1)
    x, y, ok, _ = ds.batch([0, 1])
    assert ok.tolist() == [True, False] and y.tolist() == [first.label, 3]
    assert torch.equal(x[0], ref[0]) and int(x[1].abs().sum()) == 0
    assert list(ds._images) == [(0, first.offset)]


def test_extract_reports_the_teacher_val_top1_of_the_cached_logits(built, caplog):
    import logging

    from stages.extract import cached_val_top1, report_cached_val_top1

    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    b = cache.block("val", 0)
    labels = cache.column("label")[b.start : b.stop]
    want = 100.0 * np.mean(cache.read("logits", b.start, b.stop).argmax(1) == labels)
    assert cached_val_top1(cache) == pytest.approx(want)
    assert recs["extract"].summary["teacher_val_top1"] == pytest.approx(want, abs=1e-3)
    # the teacher stage evaluated the same plain val views in float32: the cached float16 logits agree
    assert want == pytest.approx(recs["teacher"].summary["val_top1"], abs=0.5)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        report_cached_val_top1(cache, {"val_top1": want + 5})
    assert "weights or preprocessing differ" in caplog.text
