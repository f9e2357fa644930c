"""What a student trains on: the first K' of the cache's views, fresh views every epoch, a per-class
subset of the images, online students on the very views a cached one replays, the targets each
loss kind reads, and the evaluation/checkpoint cadence (with its resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cache.reader import Cache, open_cache
from cache.rows import Samples
from pipeline.config import ConfigError, config_from_dict
from stages import models
from stages.data import per_class_subset
from stages.trainer import Trainer
from stages.spectral import pool_channels
from tests.conftest import TINY, tiny_tree

NOWHERE = Path("/nonexistent")


def _student(cfg, name: str, **update):
    return cfg.student(name).model_copy(update=update)


def _rows_of(batches) -> np.ndarray:
    return np.concatenate([rows.numpy() for _, _, rows, _ in batches])


def test_views_k_reads_only_the_first_k_views(built, monkeypatch):
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    assert cache.view_count("train") == 2
    reads = []
    real = Cache.read
    monkeypatch.setattr(Cache, "read", lambda self, name, a, b: reads.append((name, a, b)) or real(self, name, a, b))
    tr = Trainer(cfg, _student(cfg, "spectral", views=1, keep_targets_mb=0), cache, NOWHERE)
    v0 = cache.block("train", 0)
    for epoch in range(3):
        seen = _rows_of(tr.train_batches(epoch))
        assert seen.min() >= v0.start and seen.max() < v0.stop
        assert len(seen) == int(cache.valid[v0.start : v0.stop].sum())
    targets = [(name, a, b) for name, a, b in reads if name == "logits" or name.startswith("spectra/")]
    assert {name for name, _, _ in targets} == {"logits", "spectra/blocks.0", "spectra/blocks.3"}
    assert all(v0.start <= a < b <= v0.stop for _, a, b in targets)
    # without views, epoch 1 reads view 1
    full = Trainer(cfg, cfg.student("spectral"), cache, NOWHERE)
    v1 = cache.block("train", 1)
    assert _rows_of(full.train_batches(1)).min() >= v1.start


def test_views_beyond_the_cache_or_fresh_cached_targets_are_config_errors():
    with pytest.raises(ConfigError, match=r"views 3 is more than the cache's extract.views 2"):
        config_from_dict(tiny_tree(**{"distill.defaults.views": 3}))
    with pytest.raises(ConfigError, match=r"students\[1\] \(spectral\): views 'fresh' needs mode: online"):
        config_from_dict(tiny_tree(**{"distill.defaults.views": "fresh"}))
    cfg = config_from_dict(tiny_tree(**{"distill.defaults.views": "fresh", "distill.defaults.mode": "online"}))
    assert cfg.student("spectral").views == "fresh"
    with pytest.raises(ConfigError, match="views"):
        config_from_dict(tiny_tree(**{"distill.defaults.views": 0}))


def test_fresh_views_are_new_each_epoch_and_deterministic(built):
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    st = _student(cfg, "none", views="fresh")
    tr = Trainer(cfg, st, cache, NOWHERE)
    b = cache.block("train", 0)
    cached = tr.dataset.rows
    d0, d1 = tr.train_dataset(0), tr.train_dataset(1)
    i = np.arange(b.start, b.stop)
    assert np.array_equal(d0.rows.sample[i], cached.sample[i])  # the same images as view 0
    for f in ("crop_top", "crop_left", "crop_height"):
        assert not np.array_equal(d0.rows.params[f][i], cached.params[f][i])  # not the stored view
        assert not np.array_equal(d0.rows.params[f][i], d1.rows.params[f][i])  # another view every epoch
    again = Trainer(cfg, st, cache, NOWHERE).train_dataset(1)
    assert all(np.array_equal(again.rows.params[f], d1.rows.params[f]) for f in d1.rows.params)
    # the stored rows of the cache are untouched, and the batches hold the fresh pixels with their labels
    assert tr.dataset.rows is cached
    x, y, rows, tg = next(iter(tr.train_batches(1)))
    r = int(rows[0])
    want = tr.dataset.normalize(d1.batch([r])[0], [r])[0]
    assert torch.equal(x[0], want) and not torch.equal(x[0], tr.dataset.normalize(tr.dataset.batch([r])[0], [r])[0])
    assert np.array_equal(y.numpy(), cache.column("label")[rows.numpy()])
    assert tg == {}


def test_per_class_subset_takes_n_per_class_whatever_the_order():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 4, n)
    keys = [f"s{i:04d}" for i in range(n)]

    def samples(order):
        return Samples(["u"], np.zeros(n, np.int32), pa.array([keys[i] for i in order]), labels[order],
                       np.zeros(n, np.int64), np.zeros(n, np.int64))

    ident = np.arange(n)
    cand = ident[ident % 3 != 0]  # only these may be chosen
    keep = per_class_subset(samples(ident), cand, 7, seed=0)
    for c in range(4):
        assert keep[labels == c].sum() == min(7, int(np.sum(labels[cand] == c)))
    assert not keep[ident % 3 == 0].any()
    perm = rng.permutation(n)
    keep_p = per_class_subset(samples(perm), np.argsort(perm)[cand], 7, seed=0)
    assert {keys[i] for i in perm[keep_p]} == {keys[i] for i in np.flatnonzero(keep)}  # keys, not positions
    assert not np.array_equal(per_class_subset(samples(ident), cand, 7, seed=1), keep)
    assert per_class_subset(samples(ident), cand, 1000, seed=0).sum() == len(cand)


def test_train_per_class_trains_on_the_same_images_every_view(built):
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    tr = Trainer(cfg, _student(cfg, "spectral", train_per_class=5), cache, NOWHERE)
    rows = tr.dataset.rows
    per_epoch = []
    for epoch in (0, 1):
        seen = _rows_of(tr.train_batches(epoch))
        assert np.array_equal(np.bincount(rows.labels(seen), minlength=10), np.full(10, 5))
        assert np.array_equal(np.sort(tr.train_labels(epoch)), np.sort(rows.labels(seen)))
        per_epoch.append(set(rows.samples.key.take(pa.array(rows.sample[seen])).to_pylist()))
    assert per_epoch[0] == per_epoch[1]  # the same 50 images, in view 0 and view 1
    # a unit's targets are read whole and cut to the kept rows: each batch's are its rows' own
    for _, _, rows_b, tg in tr.train_batches(1):
        r = rows_b.numpy()
        assert np.array_equal(tg["logits"].numpy(), np.stack([cache.read("logits", i, i + 1)[0] for i in r]))
        for t in tr.widths:
            want = torch.from_numpy(np.stack([cache.read_layer("spectra", t, i, i + 1)[0] for i in r]))
            assert torch.equal(tg[t], pool_channels(want.float(), tr.widths[t]))


def test_online_on_replayed_views_matches_cached_first_steps(built):
    """An online student on the cache's views and a cached one of the same seed take the same first
    steps: same rows, same pixels, targets that agree within float16 storage."""
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    teacher = models.load_teacher(recs["teacher"], cfg)
    cached = Trainer(cfg, _student(cfg, "spectral"), cache, NOWHERE)
    online = Trainer(cfg, _student(cfg, "spectral", mode="online"), cache, NOWHERE, teacher=teacher)
    opts = [torch.optim.SGD(t.model.parameters(), lr=0.05) for t in (cached, online)]
    terms = [[], []]
    for k, tr in enumerate((cached, online)):
        for step, (x, y, rows, tg) in enumerate(tr.train_batches(0)):
            torch.manual_seed(step)
            terms[k].append((rows.clone(), tr.step(x, y, tg, opts[k])))
            if step == 2:
                break
    for (rc, tc), (ro, to) in zip(*terms):
        assert torch.equal(rc, ro)
        for name in ("total", "ce", "kd", "spectral"):
            assert tc[name] == pytest.approx(to[name], rel=3e-3, abs=1e-5), name
        assert tc["kd"] > 0 and tc["spectral"] > 0


def test_views_and_subset_enter_the_student_fingerprint():
    from pipeline.schema import decisive

    cfg = config_from_dict(TINY)
    base = decisive(cfg.student("none"))
    assert decisive(_student(cfg, "none", views=1)) != base
    assert decisive(_student(cfg, "none", train_per_class=3)) != base


def test_eval_every_evaluates_and_checkpoints_every_n_epochs(built, tmp_path):
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    st = _student(cfg, "none", epochs=5, eval_every=2, snapshot_every=0)
    tr = Trainer(cfg, st, cache, tmp_path)
    metrics = tr.fit(max_steps=1)
    evaluated = [m["epoch"] for m in metrics if not np.isnan(m["val_top1"])]
    assert evaluated == [1, 3, 4]  # every 2nd epoch and the last
    assert all(np.isfinite(m["loss_total"]) for m in metrics)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 4


@pytest.mark.parametrize("student,kind,keys", [("spectral", "hard", {"logits", 0, 3}), ("none", "hard", {"logits"}),
                                               ("spectral", "spectral_only", {0, 3})])
def test_official_loss_kinds_read_only_what_they_need(built, student, kind, keys):
    from losses.spectralkd import SpectralKDConfig

    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    st = _student(cfg, student, loss=SpectralKDConfig(kind=kind))
    tr = Trainer(cfg, st, cache, NOWHERE)
    x, y, rows, tg = next(iter(tr.train_batches(0)))
    assert set(tg) == keys
    terms = tr.step(x, y, tg, torch.optim.SGD(tr.model.parameters(), lr=0.01))
    assert ("spectral" in terms and terms["spectral"] > 0) == (0 in keys)
    assert ("kd" in terms and terms["kd"] > 0) == ("logits" in keys)


def test_revisiting_few_stored_views_warns():
    from stages.trainer import revisit_warning

    cfg = config_from_dict(TINY)
    st = _student(cfg, "spectral", epochs=60)
    assert "30 epochs per view" in revisit_warning(st, 2)
    assert revisit_warning(st, 4) is None  # 15 per view
    assert revisit_warning(_student(cfg, "none", epochs=60), 1) is None  # no teacher targets
    assert revisit_warning(_student(cfg, "spectral", epochs=60, mode="online"), 1) is None


def test_fresh_view_student_resumes_to_the_same_metrics(built, tmp_path, monkeypatch):
    """Fresh views depend on (seed, epoch) only: a student stopped after a checkpoint and resumed
    ends with the metrics of an uninterrupted one, also with eval_every > 1."""
    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    st = _student(cfg, "none", views="fresh", epochs=4, eval_every=2, snapshot_every=0)
    (tmp_path / "whole").mkdir()
    whole = Trainer(cfg, st, cache, tmp_path / "whole").fit(max_steps=2)
    real = Trainer._train_epoch

    def crash_at_3(self, epoch, *a):
        if epoch == 3:
            raise RuntimeError("killed")
        return real(self, epoch, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_at_3)
    (tmp_path / "cut").mkdir()
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, st, cache, tmp_path / "cut").fit(max_steps=2)
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["epoch"] == 1  # epoch 2 was not checkpointed
    monkeypatch.setattr(Trainer, "_train_epoch", real)
    resumed = Trainer(cfg, st, cache, tmp_path / "cut").fit(max_steps=2)
    for a, b in zip(whole, resumed):
        assert a["loss_total"] == b["loss_total"] and (a["val_top1"] == b["val_top1"] or np.isnan(a["val_top1"]))
    assert len(resumed) == 4
