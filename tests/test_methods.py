"""Every registered method in the pipeline: cached and online targets give the same terms, a student
of each kind trains end to end from the session cache, and the extras of FitNets, ViTKD and MGD
are optimized, checkpointed and restored on resume (also after a SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import losses
from cache.reader import open_cache
from pipeline.config import ConfigError, config_from_dict
from pipeline.graph import Runner
from stages import models
from stages.trainer import Trainer
from tests.conftest import ROOT, TINY, tiny_tree, write_config

NOWHERE = Path("/nonexistent")
KWARGS = TINY["distill"]["students"][0]["kwargs"]
# the weighted terms of each kind, in the order they are summed (a student with layer pairs)
TERMS = {"none": ["ce"], "logits": ["ce", "kd"], "spectral": ["ce", "kd", "spectral"],
         "spectral_only": ["ce", "spectral"],
         "hard": ["ce", "kd", "spectral"], "dkd": ["ce", "tckd", "nckd"], "dist": ["ce", "inter", "intra"],
         "nkd": ["ce", "target", "non_target"], "logit_std": ["ce", "kd"], "fitnets": ["ce", "hint"],
         "at": ["ce", "at"], "vitkd": ["ce", "mimic", "generation"], "mgd": ["ce", "mgd"],
         "distill_token": ["ce", "kd"]}
WITH_EXTRAS = ("fitnets", "vitkd", "mgd")


def student_entry(kind: str, **fields) -> dict:
    """A tiny student named ``kind`` training with that loss kind; the distillation token's is timm's
    distilled DeiT, and every kind that can read teacher layers gets the pairs [[0, 0], [1, 3]]."""
    entry = {"name": kind, "model": "deit_tiny_distilled_patch16_224" if kind == "distill_token" else
             "deit_tiny_patch16_224", "kwargs": KWARGS, "loss": {"kind": kind}, **fields}
    cls = losses.loss_class(kind)
    if losses.needs(cls.Config(kind=kind), [(0, 0)]).reads_layers:
        entry["pairs"] = [[0, 0], [1, 3]]
    return entry


def methods_tree(kinds=losses.KINDS, **changes) -> dict:
    """The session's tiny config with one student per kind, each training on 4 images per class."""
    return tiny_tree(**{"distill.students": [student_entry(k) for k in kinds], "distill.defaults.snapshot_every": 0,
                        "distill.defaults.train_per_class": 4, **changes})


@pytest.fixture(scope="module")
def methods(built, tmp_path_factory):
    """(config with one student per kind, its model plan, the session cache, the session teacher);
    the config's workdir is fresh and reads the session pipeline's outputs as its upstream."""
    session_cfg, _, recs = built
    cfg = config_from_dict(methods_tree(), workdir=str(tmp_path_factory.mktemp("methods") / "work"))
    cfg.upstream_workdirs = [str(session_cfg.workdir)]
    return cfg, models.plan_models(cfg), open_cache(recs["extract"]), models.load_teacher(recs["teacher"], cfg)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_close(a: dict, b: dict) -> bool:
    """Equal up to float rounding: two processes may sum in another order (a few ulp, ~1e-8 here).
    Adam scales the attention key bias's gradient, which is zero up to rounding (softmax is
    shift-invariant), to a step of its own, so that bias drifts by ~1e-6; the metrics, compared
    at rel 1e-6, are the exact check of a resume."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a)


def test_cached_and_online_trainers_give_the_same_terms_for_every_kind(methods):
    """For each kind, a cached Trainer (targets read from the spectral cache: features by irfft2) and
    an online Trainer (the live teacher on the same batch) give the same terms, seeded alike for
    the masked methods, within the cache's float16 rounding."""
    cfg, plan, cache, teacher = methods
    for kind in losses.KINDS:
        st = cfg.student(kind)
        cached = Trainer(cfg, st, cache, NOWHERE, plan)
        online = Trainer(cfg, st.model_copy(update={"mode": "online"}), cache, NOWHERE, plan, teacher=teacher)
        assert state_equal(cached.model.state_dict(), online.model.state_dict())
        assert state_equal(cached.loss_fn.state_dict(), online.loss_fn.state_dict()), kind
        assert cached.layer_pairs == online.layer_pairs, kind  # the cache's shapes are the live teacher's
        x, y, rows, tg = next(iter(cached.train_batches(0)))
        needs = cached.needs
        assert set(tg) == ({"logits"} if needs.logits else set()) | ({0, 3} if needs.reads_layers else set()), kind
        if needs.form == "features":  # the stored spectra, inverted at the teacher's width
            assert tg[3].shape == (len(y), 32, 4, 4) and tg[3].dtype == torch.float32
        live = online.targets_online(x)
        if kind == "dist":
            # its intra-class relation correlates each class's probability across the batch, and the
            # session's one-epoch teacher varies less across a batch than float16 resolves: compare
            # with the live logits rounded as the cache stores them
            live["logits"] = live["logits"].half().float()
        torch.manual_seed(0)
        a = cached.loss(x, y, tg)
        torch.manual_seed(0)
        b = online.loss(x, y, live)
        assert list(a) == list(b) == ["total", *TERMS[kind]], kind
        for k in a:
            assert a[k].item() == pytest.approx(b[k].item(), rel=2e-3, abs=1e-9), (kind, k)
        assert all(a[k].item() > 0 for k in TERMS[kind]), kind


def test_a_student_of_every_kind_trains_a_step_through_the_pipeline(methods):
    """One step of every kind through ``distill`` (the graph's nodes, in-process): one metrics
    column per term, summing to the total; the extras of FitNets, ViTKD and MGD moved by the
    step and kept in ``ckpt.pt`` and ``final.pt``."""
    cfg, plan, cache, _ = methods
    runner = Runner(cfg, {"max_steps": 1})
    runner.run("distill")
    for kind in losses.KINDS:
        out = runner.student_dir(kind)
        row = pq.read_table(out / "metrics.parquet").to_pylist()[0]
        assert sorted(k for k in row if k.startswith("loss_")) == sorted(f"loss_{t}" for t in ["total", *TERMS[kind]])
        assert row["loss_total"] == pytest.approx(sum(row[f"loss_{t}"] for t in TERMS[kind]), rel=1e-6), kind
        assert 0 <= row["val_top1"] <= 100
        final = torch.load(out / "final.pt", weights_only=True)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        if kind not in WITH_EXTRAS:
            assert "loss_state_dict" not in final and "loss" not in ckpt, kind
            continue
        initial = Trainer(cfg, cfg.student(kind), cache, NOWHERE, plan).loss_fn.state_dict()
        assert state_equal(final["loss_state_dict"], ckpt["loss"]), kind
        assert final["loss_state_dict"].keys() == initial.keys()
        moved = [k for k in initial if not torch.equal(initial[k], final["loss_state_dict"][k])]
        assert moved == list(initial), f"{kind}: extras the optimizer did not move: {set(initial) - set(moved)}"
    token = torch.load(runner.student_dir("distill_token") / "final.pt", weights_only=True)["state_dict"]
    assert "head_dist.weight" in token and "dist_token" in token


@pytest.mark.parametrize("kind", WITH_EXTRAS)
def test_a_resumed_student_restores_its_extras(methods, tmp_path, monkeypatch, kind):
    """A student stopped after its first epoch's checkpoint and resumed by a fresh Trainer ends with
    the metrics and the extras of an uninterrupted run."""
    cfg, plan, cache, _ = methods
    st = cfg.student(kind).model_copy(update={"epochs": 2})
    whole = Trainer(cfg, st, cache, tmp_path / "whole", plan)
    (tmp_path / "whole").mkdir()
    want = whole.fit(max_steps=2)
    real = Trainer._train_epoch

    def crash_at_1(self, epoch, *a):
        if epoch == 1:
            raise RuntimeError("killed")
        return real(self, epoch, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_at_1)
    (tmp_path / "cut").mkdir()
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, st, cache, tmp_path / "cut", plan).fit(max_steps=2)
    saved = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["loss"].keys() == whole.loss_fn.state_dict().keys()
    monkeypatch.setattr(Trainer, "_train_epoch", real)
    resumed = Trainer(cfg, st, cache, tmp_path / "cut", plan)
    got = resumed.fit(max_steps=2)
    assert len(got) == 2
    for a, b in zip(want, got):
        for k in ["loss_total", *(f"loss_{t}" for t in TERMS[kind]), "val_top1", "val_loss"]:
            assert a[k] == b[k], (a["epoch"], k)
    assert state_equal(resumed.loss_fn.state_dict(), whole.loss_fn.state_dict())


@pytest.mark.slow
def test_sigkill_of_a_masked_method_with_extras_resumes_to_same_metrics(built, tmp_path):
    """MGD (extras, random masks): a ``distill`` process killed after its first checkpoint and rerun
    in-process ends with the metrics, the snapshots and the final weights and extras of an
    uninterrupted run; the snapshots taken before the kill survive it (kept in the checkpoint)."""
    session_cfg, _, _ = built
    tree = methods_tree(["mgd"], **{"distill.defaults.epochs": 3, "distill.defaults.snapshot_every": 1})
    conf = write_config(tmp_path / "p.yaml", tree)
    results = []
    for kill in (False, True):
        wd = tmp_path / ("killed" if kill else "clean")
        if kill:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
            cmd = [sys.executable, "-m", "pipeline", "run", "distill/mgd", "-c", str(conf), "--workdir", str(wd),
                   "--upstream-workdir", str(session_cfg.workdir)]
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while time.time() < deadline and p.poll() is None and not list(wd.glob("distill/students/*/ckpt.pt")):
                time.sleep(0.01)
            assert p.poll() is None, "distill ended before it could be killed"
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            assert not list(wd.glob("distill/students/*/final.pt"))
        cfg = config_from_dict(tree, workdir=str(wd))
        cfg.upstream_workdirs = [str(session_cfg.workdir)]
        rec = Runner(cfg).run("distill/mgd")["distill/mgd"]
        metrics = pq.read_table(Path(rec.path) / "metrics.parquet").to_pylist()
        snaps = pq.read_table(Path(rec.path) / "snapshots.parquet").to_pylist()
        results.append((metrics, snaps, torch.load(Path(rec.path) / "final.pt", weights_only=True)))
    (clean, clean_snaps, clean_final), (killed, killed_snaps, killed_final) = results
    assert len(clean) == len(killed) == 3
    for a, b in zip(clean, killed):
        for k in ("loss_total", "loss_ce", "loss_mgd", "val_top1", "val_top5", "val_loss", "batch_labels"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9, nan_ok=True), (a["epoch"], k)
    assert [(x["epoch"], x["layer"]) for x in killed_snaps] == [(e, layer) for e in range(3) for layer in range(2)]
    for a, b in zip(clean_snaps, killed_snaps):
        assert a["entropy_sum"] == pytest.approx(b["entropy_sum"], rel=1e-5), (a["epoch"], a["layer"])
    assert state_close(clean_final["loss_state_dict"], killed_final["loss_state_dict"])
    assert state_close(clean_final["state_dict"], killed_final["state_dict"])


def test_a_distillation_token_without_its_head_is_refused_before_any_work(methods):
    tree = methods_tree(["distill_token"])
    tree["distill"]["students"][0]["model"] = "deit_tiny_patch16_224"
    cfg = config_from_dict(tree)
    with pytest.raises(ConfigError, match=r"distill.students\[0\].model: loss.kind 'distill_token' needs a student "
                                         r"with a distillation token, and deit_tiny_patch16_224 has none; timm's "
                                         r"\*_distilled_\* models have one \(deit_base_distilled"):
        Runner(cfg).check_models()
