"""The public API as users call it: open_cache, CacheDataset (with DataLoader workers and
DistributedSampler), a student's loss module, run/status, and the two examples against the pipeline's
trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spectralkd
from pipeline.errors import PipelineError
from tests.conftest import ROOT, TINY, copy_upstream, trainer_batch, write_config


def _trainer(cfg, runner, name: str):
    from stages.trainer import Trainer

    cache = spectralkd.open_cache(cfg)
    return Trainer(cfg, cfg.student(name), cache, Path("/nonexistent"), runner.model_plan)


def test_open_cache_by_config_and_by_path_and_refuses_another_config(built):
    cfg, runner, recs = built
    by_config = spectralkd.open_cache(cfg)
    by_path = spectralkd.open_cache(recs["extract"].path)
    assert by_config.path == by_path.path and by_config.spec == by_path.spec
    with pytest.raises(PipelineError, match="no up-to-date cache for this config"):
        spectralkd.open_cache(cfg.model_dump(mode="json"), overrides=["extract.views=1"])


def test_dataset_items_are_the_pipeline_students_rows_pixels_and_targets(built):
    cfg, runner, recs = built
    tr = _trainer(cfg, runner, "spectral")
    ds = spectralkd.CacheDataset(tr.cache, cfg.data, layers=tr.t_layers, widths=tr.widths)
    items = [ds[i] for i in range(5)]
    x, y, rows, targets = trainer_batch(tr, np.array([it["row"] for it in items]))
    assert rows.tolist() == [it["row"] for it in items]
    torch.testing.assert_close(torch.stack([it["x"] for it in items]), x, rtol=0, atol=0)
    assert torch.equal(torch.stack([it["y"] for it in items]), y)
    for k, v in targets.items():
        torch.testing.assert_close(torch.stack([it["targets"][k] for it in items]), v.float(), rtol=0, atol=0)
    ds.set_epoch(1)  # the next view: other rows of the same images
    assert ds[0]["row"] >= tr.cache.block("train", 1).start


def test_dataset_epochs_cycle_through_the_first_k_views(built):
    cfg, runner, recs = built
    cache = spectralkd.open_cache(cfg)
    ds = spectralkd.CacheDataset(cache, cfg.data, views=1)  # K' = 1 of the cache's 2 views
    first = cache.block("train", 0)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        assert first.start <= ds[0]["row"] < first.stop
    with pytest.raises(PipelineError, match=r"CacheDataset views: 3, but .* holds 2 train views .*extract\.views"):
        spectralkd.CacheDataset(cache, cfg.data, views=3)


def test_workers_and_distributed_sampler_see_the_same_items(built):
    cfg, runner, recs = built
    cache = spectralkd.open_cache(cfg)
    ds = spectralkd.CacheDataset(cache, cfg.data, layers=[3], form="features", widths=16)
    order = ds.unit_order(seed=1)[:40]
    assert sorted(order) == sorted(set(order))
    plain = list(torch.utils.data.DataLoader(ds, batch_size=8, sampler=order))
    two = list(torch.utils.data.DataLoader(ds, batch_size=8, sampler=order, num_workers=2))
    for a, b in zip(plain, two):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["targets"][3], b["targets"][3])
    assert plain[0]["targets"][3].shape == (8, 16, 4, 4)  # features of the 4x4 token grid, pooled to 16
    halves = [list(torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True))
              for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) == len(halves[1]) == -(-len(ds) // 2)


def test_features_from_spectra_are_the_teachers_forward(built):
    from stages import models

    cfg, runner, recs = built
    cache = spectralkd.open_cache(cfg)
    ds = spectralkd.CacheDataset(cache, cfg.data, split="val", layers=[0, 3], form="features")
    teacher = models.load_teacher(recs["teacher"], cfg)
    items = [ds[i] for i in range(4)]
    with torch.no_grad():
        logits, feats = models.intermediates(teacher, torch.stack([it["x"] for it in items]), [0, 3])
    for t, f in zip((0, 3), feats):
        got = torch.stack([it["targets"][t] for it in items])
        torch.testing.assert_close(got, f, rtol=2e-3, atol=2e-3 * float(f.abs().max()))
    torch.testing.assert_close(torch.stack([it["targets"]["logits"] for it in items]), logits, rtol=2e-3, atol=2e-3)


def test_a_damaged_shard_is_the_named_error_through_a_dataloader(built, tmp_path):
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cache_dir = next((wd / "extract").glob("*/cache.zarr"))
    shard = cache_dir / "logits" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = spectralkd.open_cache(cache_dir)
    ds = spectralkd.CacheDataset(cache, cfg.data)
    with pytest.raises(PipelineError, match=r"logits: shard \d+ is corrupt"):
        for _ in torch.utils.data.DataLoader(ds, batch_size=64, sampler=ds.unit_order(), num_workers=2):
            pass


def test_a_students_loss_is_the_trainers(built):
    """spectralkd.student_loss builds the module the pipeline's trainer trains with: the same
    config, pairs and shapes, hence the same terms on the same batch."""
    cfg, runner, recs = built
    tr = _trainer(cfg, runner, "spectral")
    mine = spectralkd.student_loss(cfg, "spectral", tr.model, tr.cache)
    assert mine.pairs == tr.loss_fn.pairs and mine.reads == tr.loss_fn.reads and mine.reads.pooled
    x, y, rows, targets = next(iter(tr.train_batches(0)))
    with torch.no_grad():
        logits, feats = tr.net(x)
        got = mine(spectralkd.StudentOutputs(logits, feats),
                   spectralkd.TeacherTargets(targets["logits"], [targets[t] for t in tr.t_layers]), y)
        want = tr.loss(x, y, targets)
    assert list(got) == list(want) == ["total", "ce", "kd", "spectral"]
    assert all(float(got[k]) == float(want[k]) for k in got) and float(got["spectral"]) > 0
    with pytest.raises(ValueError, match="unknown loss kind 'soft'"):
        spectralkd.loss("soft")


def test_run_and_status_from_python(built, tmp_path):
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    states = {s.stage: s.status for s in spectralkd.status(TINY, workdir=str(wd))}
    assert states["extract"] == "up to date" and states["distill/none"] == "missing"
    done = spectralkd.run(TINY, "distill/none", workdir=str(wd))
    assert done["distill/none"].summary["student"] == "none"
    assert {s.stage: s.status for s in spectralkd.status(TINY, workdir=str(wd))}["distill/none"] == "up to date"


def _example(script: str, conf: Path, wd: str, *extra: str, torchrun: int = 0) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    args = [str(ROOT / "examples" / script), "-c", str(conf), "--workdir", wd, "--student", "spectral",
            "--steps", "2", "--in-order", "--log-steps", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
           if torchrun else [sys.executable, *args])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("script,procs", [("train_plain.py", 0), ("train_ddp.py", 2)])
def test_examples_first_step_loss_equals_the_trainers(built, tmp_path, script, procs):
    cfg, runner, recs = built
    conf = write_config(tmp_path / "p.yaml", TINY)
    steps = _example(script, conf, str(cfg.workdir), torchrun=procs)
    first = next(s for s in steps if s["step"] == 0 and s.get("rank", 0) == 0)
    assert len([s for s in steps if s["step"] == 0]) == max(1, procs)
    tr = _trainer(cfg, runner, "spectral")
    x, y, rows, targets = trainer_batch(tr, np.array(first["rows"]))
    order = np.argsort(first["rows"])  # the trainer's batch holds the same rows, in cache order
    assert rows.tolist() == np.array(first["rows"])[order].tolist()
    with torch.no_grad():
        want = float(tr.loss(x, y, targets)["total"])
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    assert any(s["step"] == 1 for s in steps)  # and it trains on
