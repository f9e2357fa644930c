"""Rows at scale: a layout independent of input order, batches that mix the classes, no per-row objects."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import config_from_dict
from pipeline.graph import Runner
from stages.views import ViewPolicy, sample_views, uniform
from cache.reader import open_cache
from stages.extract import plan_rows
from stages.shards import Samples
from tests.conftest import tiny_tree


def _samples(n: int, classes: int = 7, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples([f"/data/s{i}.tar" for i in range(3)], rng.integers(0, 3, n).astype(np.int32),
                   pa.array([f"img_{i:06d}" for i in range(n)]), rng.integers(0, classes, n),
                   rng.integers(0, 10**6, n), rng.integers(100, 900, n))


def _layout(rows) -> dict:
    """What a cache's rows are, whatever the input order: key, label and view parameters per row."""
    keys = rows.samples.key.take(pa.array(rows.sample)).to_pylist()
    return {"key": keys, "label": rows.labels(np.arange(len(rows))).tolist(),
            **{f: c.tolist() for f, c in rows.params.items()}}


@settings(max_examples=20, deadline=None)
@given(n_train=st.integers(1, 300), n_val=st.integers(1, 50), seed=st.integers(0, 5), perm_seed=st.integers(0, 99))
def test_layout_is_independent_of_input_order_and_reproducible(n_train, n_val, seed, perm_seed):
    cfg = config_from_dict(tiny_tree(**{"seed": seed, "extract.views": 3}))
    train, val = _samples(n_train, seed=1), _samples(n_val, seed=2)
    rows, blocks = plan_rows(cfg, train, val)
    rng = np.random.default_rng(perm_seed)
    shuffled, shuffled_blocks = plan_rows(cfg, train.take(rng.permutation(n_train)), val.take(rng.permutation(n_val)))
    assert shuffled_blocks == blocks
    assert _layout(shuffled) == _layout(rows)
    again, _ = plan_rows(cfg, train, val)
    assert _layout(again) == _layout(rows)
    # each view block is a permutation of all train samples, a new one per view (when there is room)
    keys = _layout(rows)["key"]
    views = [keys[b["start"] : b["stop"]] for b in blocks if b["split"] == "train"]
    assert all(sorted(v) == sorted(train.key.to_pylist()) for v in views)
    if n_train >= 20:
        assert views[0] != views[1]


def test_another_seed_gives_another_layout():
    train, val = _samples(200), _samples(20, seed=2)
    a, _ = plan_rows(config_from_dict(tiny_tree(seed=0)), train, val)
    b, _ = plan_rows(config_from_dict(tiny_tree(seed=1)), train, val)
    assert _layout(a)["key"] != _layout(b)["key"] and _layout(a)["crop_top"] != _layout(b)["crop_top"]


def test_view_sampler_draws_the_declared_distributions():
    h = _samples(20000).key_hashes()
    u = uniform(h, 0, 0, 0)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01  # sd of the mean ~0.002
    assert abs(np.corrcoef(u, uniform(h, 0, 0, 1))[0, 1]) < 0.03  # draws are uncorrelated
    v = sample_views(h, 0, 0, ViewPolicy(size=32, scale=(0.3, 0.7), ratio=(0.75, 4 / 3), hflip=0.5))
    area = v["crop_height"] * v["crop_width"]
    assert 0.3 - 1e-9 <= area.min() and area.max() <= 0.7 + 1e-9
    assert abs(area.mean() - 0.5) < 0.01  # U(0.3, 0.7): sqrt(0.7 * 4/3) < 1, so every first try fits
    aspect = np.log(v["crop_width"] / v["crop_height"])
    assert abs(aspect.mean()) < 0.01 and aspect.min() >= np.log(0.75) - 1e-9
    assert np.all(v["crop_top"] + v["crop_height"] <= 1 + 1e-12) and np.all(v["crop_left"] + v["crop_width"] <= 1)
    assert abs(v["flip"].mean() - 0.5) < 0.02


def _class_sorted_shards(recs, out: Path, per_shard: int, order: str) -> str:
    """The prepared train samples rewritten as webdataset tars in class order (or shuffled)."""
    import webdataset as wds

    items = []
    for tar in sorted(Path(recs["prepare"].path).glob("train-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name[:-4]
                items.append((int(members[key + ".cls"]), key, data))
    items.sort() if order == "sorted" else np.random.default_rng(5).shuffle(items)
    out.mkdir()
    n = -(-len(items) // per_shard)
    for s in range(n):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar"), mtime=0.0) as w:
            for label, key, data in items[s * per_shard : (s + 1) * per_shard]:
                w.write({"__key__": key, "png": data, "cls": str(label).encode()})
    return str(out / f"train-{{000000..{n - 1:06d}}}.tar")


@pytest.mark.slow
def test_class_sorted_shards_give_mixed_batches_and_the_same_cache_as_shuffled(built, tmp_path):
    from stages.batches import BatchMix
    from stages.trainer import Trainer

    cfg, runner, recs = built
    val = str(next(Path(recs["prepare"].path).glob("val-*.tar")))
    caches = {}
    for order, per_shard in (("sorted", 500), ("shuffled", 333)):
        tree = tiny_tree(**{"data.source": "shards", "data.val_shards": val, "teacher.fit": None,
                            "data.train_shards": _class_sorted_shards(recs, tmp_path / order, per_shard, order)})
        c = config_from_dict(tree, workdir=str(tmp_path / f"w-{order}"))
        caches[order] = (c, open_cache(Runner(c).run("extract")["extract"]))
    (c, sorted_cache), (_, shuffled_cache) = caches["sorted"], caches["shuffled"]
    assert _layout(sorted_cache.rows()) == _layout(shuffled_cache.rows())
    for name in ("logits", "spectra/blocks.0", "valid"):
        np.testing.assert_array_equal(sorted_cache.read(name, 0, 1797), shuffled_cache.read(name, 0, 1797))
    # epoch 0's batches hold as many classes as a uniform shuffle would
    st_cfg = c.student("none")
    tr = Trainer(c, st_cfg, sorted_cache, tmp_path / "student")
    mix = BatchMix(tr.train_labels(0), st_cfg.batch_size)
    for _, y, _, _ in tr.train_batches(0):
        mix.add(y)
    got = mix.summary()
    assert len(mix.distinct) >= 20
    assert got["batch_labels"] >= 0.9 * got["batch_labels_uniform"], got
    # same cache, same seeds: a student trains identically from either input order
    metrics = {}
    for order, (c, _) in caches.items():
        c.distill.students = c.distill.students[:1]
        Runner(c).run("distill")
        m = pq.read_table(Runner(c).student_dir("none") / "metrics.parquet").to_pylist()[0]
        metrics[order] = {k: m[k] for k in ("loss_total", "val_top1", "batch_labels")}
    assert metrics["sorted"] == metrics["shuffled"]


def test_batch_mix_warns_on_class_sorted_batches(caplog):
    import torch

    from stages.batches import BatchMix

    labels = np.repeat(np.arange(10), 64)
    mix = BatchMix(labels, 64)
    for c in range(10):
        mix.add(torch.full((64,), c))
    with caplog.at_level("INFO", logger="pipeline"):
        mix.check("s")
    assert mix.summary()["batch_labels"] == 1.0 and mix.uniform > 9.9
    assert any(r.levelname == "WARNING" and "not mixed" in r.message for r in caplog.records)
