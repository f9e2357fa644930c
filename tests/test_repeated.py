"""Repeated augmentation over stored views: the sampler's invariants (hypothesis) and a student that
trains with it from the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import PipelineError
from stages.repeated import epoch_views, repeated_batches
from tests.conftest import copy_upstream, tiny_tree


def _layout(n: int, views: int, seed: int, bad: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """image_rows of a view-major cache (each view a permutation of the images), key hashes."""
    rng = np.random.default_rng(seed)
    rows = np.full((n, views), -1, dtype=np.int64)
    for v in range(views):
        perm = rng.permutation(n)
        rows[perm, v] = v * n + np.arange(n)
    rows[sorted(bad)] = -1
    keys = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    return rows, keys


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), views=st.integers(1, 6), r=st.integers(1, 4), per_batch=st.integers(1, 5),
       epoch=st.integers(0, 7), world=st.integers(1, 3), seed=st.integers(0, 3), data=st.data())
def test_each_images_views_share_a_batch_every_row_once_ranks_disjoint(n, views, r, per_batch, epoch, world, seed,
                                                                        data):
    if r > views:
        with pytest.raises(PipelineError, match="needs at least"):
            epoch_views(epoch, r, views)
        return
    bad = set(data.draw(st.sets(st.integers(0, n - 1), max_size=n // 3)))
    image_rows, keys = _layout(n, views, seed, bad)
    batch = r * per_batch
    ranks = [repeated_batches(image_rows, keys, r, batch, epoch, seed, rank, world) for rank in range(world)]
    want_views = epoch_views(epoch, r, views)
    image_of = {int(row): i for i in range(n) for row in image_rows[i] if row >= 0}
    seen_images: list[set[int]] = []
    all_rows: list[int] = []
    for batches in ranks:
        images = set()
        for b in batches:
            assert len(b) <= batch
            groups = {}
            for row in b:
                groups.setdefault(image_of[row], []).append(row)
            for i, rows in groups.items():  # all r views of an image, in one batch
                assert sorted(rows) == sorted(image_rows[i, want_views].tolist())
                assert i not in bad
            images |= set(groups)
            all_rows += b
        seen_images.append(images)
    assert len(all_rows) == len(set(all_rows))  # every row once
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen_images[a] & seen_images[b]  # ranks take disjoint images
    assert len({len(s) for s in seen_images}) == 1  # equally many
    usable = n - len(bad)
    assert sum(len(s) for s in seen_images) == (math.ceil(usable / r) // world) * world if world > 1 \
        else math.ceil(usable / r)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 5), epoch=st.integers(0, 4))
def test_batches_do_not_depend_on_the_input_order(n, seed, epoch):
    image_rows, keys = _layout(n, 3, seed, set())
    perm = np.random.default_rng(seed + 100).permutation(n)
    a = repeated_batches(image_rows, keys, 3, 6, epoch, seed)
    b = repeated_batches(image_rows[perm], keys[perm], 3, 6, epoch, seed)
    assert a == b


def test_epochs_cycle_through_the_stored_views():
    assert [epoch_views(e, 3, 16) for e in range(6)][:2] == [[0, 1, 2], [3, 4, 5]]
    assert epoch_views(5, 3, 16) == [15, 0, 1]
    counts = np.bincount(np.concatenate([epoch_views(e, 3, 16) for e in range(16)]), minlength=16)
    assert (counts == 3).all()


def test_config_refuses_repeats_beyond_the_views_or_the_batch():
    with pytest.raises(ConfigError, match="repeated_aug 3 takes that many stored views .* reads 2"):
        config_from_dict(tiny_tree(**{"distill.defaults.repeated_aug": 3, "distill.defaults.batch_size": 63}))
    with pytest.raises(ConfigError, match="batch_size 64 is not a multiple of repeated_aug 3"):
        config_from_dict(tiny_tree(**{"distill.defaults.repeated_aug": 3, "extract.views": 3}))


@pytest.mark.slow
def test_a_student_trains_with_repeated_augmentation(built, tmp_path):
    """With repeated_aug 2 a cached student's batches hold both stored views of each of half the images."""
    from pipeline.graph import Runner
    from stages.trainer import Trainer

    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg2 = config_from_dict(tiny_tree(**{"distill.defaults.repeated_aug": 2}), workdir=str(wd))
    r = Runner(cfg2)
    tr = Trainer(cfg2, cfg2.student("spectral"), __import__("spectralkd").open_cache(cfg2), tmp_path / "s",
                 r.model_plan)
    batches = tr.train_batches(0)
    rows = np.concatenate([idx.numpy() for _, _, idx, _ in batches])
    samples = tr.dataset.rows.sample[rows]
    assert len(rows) == len(set(rows.tolist()))
    assert np.bincount(samples)[np.unique(samples)].tolist() == [2] * len(np.unique(samples))
    n_images = int(tr.cache.valid[tr.cache.block("train", 0).start: tr.cache.block("train", 0).stop].sum())
    assert len(np.unique(samples)) == math.ceil(n_images / 2)
    rec = r.run("distill/spectral")["distill/spectral"]
    assert rec.summary["student"] == "spectral" and np.isfinite(rec.summary["val_top1"])


def test_the_deit_recipe_replays_repeated_augmentation_and_every_recipe_loads():
    from pipeline.config import load_config
    from pipeline.recipes import recipe_names
    from tests.conftest import ROOT

    for name in recipe_names():
        load_config(ROOT / "configs" / f"{name}.yaml")
    deit = load_config(ROOT / "configs" / "cait_s24_to_deit_tiny_imagenet.yaml")
    assert {deit.student(s.name).repeated_aug for s in deit.distill.students} == {3}
    assert "Not replayed" not in (ROOT / "configs" / "cait_s24_to_deit_tiny_imagenet.yaml").read_text()


def test_an_online_teacher_normalized_otherwise_gets_its_own_input_under_repeats(built, tmp_path):
    """Repeated batches carry the teacher's own input ("teacher_x"), as the plain ones do."""
    import torch

    import spectralkd
    from pipeline.graph import Runner
    from stages.trainer import Trainer

    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg2 = config_from_dict(tiny_tree(**{"distill.defaults.repeated_aug": 2, "distill.defaults.mode": "online",
                                         "teacher.mean": [0.4, 0.4, 0.4], "teacher.std": [0.2, 0.2, 0.2]}),
                            workdir=str(wd))
    cache = spectralkd.open_cache(recs["extract"].path)
    from stages import models

    teacher = models.load_teacher(recs["teacher"], cfg)
    tr = Trainer(cfg2, cfg2.student("spectral"), cache, tmp_path / "s", Runner(cfg2).model_plan, teacher=teacher)
    x, y, rows, targets = next(iter(tr.train_batches(0)))
    assert set(targets) == {"teacher_x"} and targets["teacher_x"].shape == x.shape
    assert not torch.allclose(targets["teacher_x"], x)
