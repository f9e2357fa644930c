"""distill: cached == online targets, three kinds from one cache, resume, refusing bad caches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cache.reader import Cache
from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from stages import models
from stages.distill import check_cache_teacher
from stages.trainer import Trainer
from stages.spectral import pool_channels
from cache.reader import cache_path, open_cache
from tests.conftest import ROOT, TINY, copy_upstream, tiny_tree, write_config


def test_cached_loss_equals_online_loss(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    teacher = models.load_teacher(recs["teacher"], cfg)
    st = cfg.student("spectral")
    tr = Trainer(cfg, st, cache, Path("/nonexistent"), teacher=teacher)
    x, y, rows, tg = next(iter(tr.train_batches(0)))
    assert set(tg) == {"logits", 0, 3}
    for t in (0, 3):  # the stored float16 spectra, pooled once per read to the student's width
        stored = torch.from_numpy(np.stack([cache.read_layer("spectra", t, r, r + 1)[0] for r in rows.tolist()]))
        assert tg[t].dtype == torch.float32 and tg[t].shape[1] == tr.widths[t] < stored.shape[1]
        assert torch.equal(tg[t], pool_channels(stored.float(), tr.widths[t]))
    torch.manual_seed(0)
    cached = tr.loss(x, y, tg)
    online = tr.loss(x, y, tr.targets_online(x))
    assert list(cached) == ["total", "ce", "kd", "spectral"]
    for k in cached:
        assert cached[k].item() == pytest.approx(online[k].item(), rel=2e-3, abs=1e-5), k
    assert cached["spectral"].item() > 0 and cached["kd"].item() > 0


def test_loader_reads_one_view_per_epoch_in_chunk_units(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    tr = Trainer(cfg, cfg.student("spectral"), cache, Path("/nonexistent"))
    for epoch in (0, 1, 2):
        b = cache.block("train", epoch % 2)
        it = tr.train_batches(epoch)
        seen = np.concatenate([rows.numpy() for _, _, rows, _ in it])
        assert sorted(seen.tolist()) == list(range(b.start, b.stop))  # every row of view e mod K, once
        units = it.units
        assert all((a // it.unit) == ((bb - 1) // it.unit) for a, bb in units)  # no unit crosses a chunk
        labels = cache.column("label")
        x, y, rows, _ = next(iter(tr.train_batches(epoch)))
        assert np.array_equal(y.numpy(), labels[rows.numpy()])


def test_students_train_from_one_cache(built):
    cfg, runner, recs = built
    done = runner.run("distill")
    rec = done["distill"]
    summary = pq.read_table(Path(rec.path) / "summary.parquet").to_pylist()
    assert [r["kind"] for r in summary] == ["teacher", "none", "spectral"]
    assert (Path(rec.path) / "summary.md").read_text().count("|") > 10
    for name in ("none", "spectral"):
        m = pq.read_table(runner.student_dir(name) / "metrics.parquet").to_pylist()
        assert len(m) == 1
        assert {"loss_total", "loss_ce", "val_top1", "val_top5"} <= set(m[0])
        assert 0 <= m[0]["val_top1"] <= 100
    spec = pq.read_table(runner.student_dir("spectral") / "metrics.parquet").to_pylist()[0]
    assert spec["loss_spectral"] > 0 and spec["loss_kd"] > 0
    assert spec["loss_total"] == pytest.approx(spec["loss_ce"] + spec["loss_kd"] + spec["loss_spectral"], rel=1e-6)
    none = pq.read_table(runner.student_dir("none") / "metrics.parquet").to_pylist()[0]
    assert "loss_spectral" not in none and "loss_kd" not in none  # a loss logs the terms it has
    assert none["loss_total"] == none["loss_ce"]
    # a second run reuses everything
    again = Runner(cfg).run("distill")
    assert again["distill"].lock["fingerprint"] == rec.lock["fingerprint"]


def test_cache_with_other_fingerprint_is_refused(built):
    cfg, runner, recs = built
    other = Runner(config_from_dict(TINY, ["extract.views=3"], workdir=str(cfg.workdir)))
    fp, inputs = other.fingerprint_of("extract")
    with pytest.raises(PipelineError, match=r"differs in: .*params\.extract\.views"):
        Cache(cache_path(recs["extract"]), expect_fingerprint=fp, expect_inputs=inputs)


def test_cache_from_other_teacher_is_refused(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])

    class FakeTeacher:
        summary = {"weights_sha256": "f" * 64}

    with pytest.raises(PipelineError, match="teacher weights"):
        check_cache_teacher(cache, FakeTeacher())


def test_missing_teacher_layer_is_named(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    with pytest.raises(PipelineError, match=r"teacher layer 2 is not in the cache \(cached: \[0, 3\]\)"):
        cache.layer(2)


def test_student_wider_than_teacher_fails_before_training(built, tmp_path):
    cfg, runner, recs = built
    cfg2 = config_from_dict(tiny_tree(**{"distill.students[1].kwargs.embed_dim": 64}), workdir=str(tmp_path))
    with pytest.raises(PipelineError, match=r"layer pair spectral \[0, 0\]: student has 64 channels"):
        Trainer(cfg2, cfg2.student("spectral"), open_cache(recs["extract"]), tmp_path / "s")


def test_corrupt_chunk_fails_distill_naming_shard(built, tmp_path):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cdir = next(wd.glob("extract/*/cache.zarr"))
    f = cdir / "spectra" / "blocks.3" / "c" / "1" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[300] ^= 0xFF
    f.write_bytes(bytes(b))
    cfg2 = config_from_dict(TINY, workdir=str(wd))
    with pytest.raises(PipelineError, match=r"spectra/blocks\.3: shard 1 is corrupt"):
        Runner(cfg2, {"students": ["spectral"]}).run("distill")
    assert not list(wd.glob("distill/students/spectral-*/final.pt"))


@pytest.mark.slow
def test_torchrun_ddp_distill_two_ranks(built, tmp_path):
    cfg, runner, recs = built
    tree = tiny_tree(**{"distill.defaults.epochs": 2, "distill.students": [TINY["distill"]["students"][1]]})
    conf = write_config(tmp_path / "p.yaml", tree)
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         "-m", "pipeline", "run", "distill", "-c", str(conf), "--workdir", str(wd)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = pq.read_table(next(wd.glob("distill/students/spectral-*/metrics.parquet"))).to_pylist()
    assert [row["epoch"] for row in m] == [0, 1]
    assert all(row["loss_spectral"] > 0 and 0 <= row["val_top1"] <= 100 for row in m)
    assert "DDP over 2 processes" in r.stderr


def test_targets_are_kept_in_memory_across_epochs(built, monkeypatch):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    tr = Trainer(cfg, cfg.student("spectral"), cache, Path("/nonexistent"))
    assert tr.memory == {} and 0 < tr.target_bytes() <= 64 * 2**20
    first = {int(r): {k: v[i].clone() for k, v in tg.items()}
             for _, _, rows, tg in tr.train_batches(0) for i, r in enumerate(rows)}
    held = sum(t.nbytes for unit in tr.memory.values() for t in unit.values())
    assert held * tr.views == tr.target_bytes()  # the budget counts what is held: pooled float32 here
    reads = []
    real = Cache.read
    monkeypatch.setattr(Cache, "read", lambda self, *a: reads.append(a) or real(self, *a))
    again = {int(r): {k: v[i] for k, v in tg.items()}
             for _, _, rows, tg in tr.train_batches(2) for i, r in enumerate(rows)}  # view 0 again
    assert reads == []  # served from memory
    assert first.keys() == again.keys()
    for r in list(first)[:50]:
        for k in first[r]:
            assert torch.equal(first[r][k], again[r][k])
    # a zero budget reads from the cache every epoch
    st0 = cfg.student("spectral").model_copy(update={"keep_targets_mb": 0})
    assert Trainer(cfg, st0, cache, Path("/nonexistent")).memory is None
