"""The DeiT train policy replayed from stored parameters: each op against timm/torchvision called
directly, the sampler's distributions against timm's own RandAugment and RandomErasing, the eval
transform against timm's, and a cache built with the whole policy against its teacher rerun."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy import stats

import timm.data.auto_augment as taa
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from stages.data import ImageReader, ViewDataset, decode_image
from stages.pixels import erase, rand_augment_op
from stages.views import (RA_OPS, RandAugment, ViewPolicy, crop_box, sample_erasing,
                          sample_rand_augment, sample_views, val_views, view_array)
from tests.conftest import ROOT, assert_reproduces_cached_targets, copy_upstream, tiny_tree

DEIT = {"scale": [0.08, 1.0], "hflip": 0.5, "interpolation": "bicubic", "auto_augment": "rand-m9-mstd0.5-inc1",
        "re_prob": 0.25, "re_mode": "pixel", "re_count": 1, "mixup": 0.8, "cutmix": 1.0}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real JPEG (scikit-learn's sample image), cut to a small non-square RGB image."""
    from sklearn.datasets import load_sample_images

    a = load_sample_images().images[0]
    return Image.fromarray(a[100:160, 200:248])  # 48 wide, 60 high


def _keys(n: int, salt: str = "") -> np.ndarray:
    from cache.rows import string_hashes
    import pyarrow as pa

    return string_hashes(pa.array([f"{salt}img_{i:07d}" for i in range(n)]))


# ----------------------------------------------------------------------------- each op against timm


def _timm_args(name: str, level: float, hparams: dict) -> tuple:
    """timm's own argument for an op at a signed level (its random sign forced to ours)."""
    fn = taa.LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    with mock.patch.object(taa.random, "random", return_value=1.0 if level < 0 else 0.0):
        return fn(abs(level), hparams)


@pytest.mark.parametrize("name", RA_OPS)
@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC])
def test_each_rand_augment_op_equals_timms(photo, name, resample):
    fill = (124, 116, 104)
    hparams = {"translate_const": 100, "img_mean": fill, "interpolation": resample}
    for level in (0.0, 3.7, 9.0, 10.0, -6.2, -9.5):
        if level < 0 and name not in {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
                                      "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                      "SharpnessIncreasing"}:
            continue
        args = _timm_args(name, level, hparams)
        if name.startswith("Posterize") and args[0] <= 0:  # today's PIL refuses 0 bits; it used to give black
            want = Image.new("RGB", photo.size)
        else:
            want = taa.NAME_TO_OP[name](photo, *args, fillcolor=fill, resample=resample)
        got = rand_augment_op(photo, name, level, fill, resample)
        assert got.size == photo.size
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{name} at level {level}")
    # the op does something at a high level (a table entry that ignored its argument would pass above
    # only if timm's op ignored it too)
    if name not in {"AutoContrast", "Equalize", "Invert"}:
        assert not np.array_equal(np.asarray(rand_augment_op(photo, name, 9.0, fill, resample)), np.asarray(photo))


def test_full_deit_view_equals_the_ops_composed_directly(photo):
    """view_array of a full-policy view == torchvision's resized_crop and hflip, then timm's ops."""
    policy = ViewPolicy(size=24, scale=(0.08, 1.0), hflip=0.5, interpolation="bicubic",
                        rand_augment=RandAugment.parse("rand-m9-mstd0.5-inc1"), mean=(0.485, 0.456, 0.406))
    cols = sample_views(_keys(64), 3, 0, policy)
    hparams = {"translate_const": 10, "img_mean": policy.fill, "interpolation": Image.BICUBIC}
    applied = 0
    for i in range(64):
        p = {f: c[i] for f, c in cols.items()}
        top, left, h, w = crop_box(p, photo.width, photo.height)
        want = TF.resized_crop(photo, top, left, h, w, [24, 24], InterpolationMode.BICUBIC)
        if p["flip"]:
            want = TF.hflip(want)
        for op, on, level in zip(p["ra_op"], p["ra_applied"], p["ra_level"]):
            if on:
                applied += 1
                name = RA_OPS[op]
                want = taa.NAME_TO_OP[name](want, *_timm_args(name, float(level), hparams), fillcolor=policy.fill,
                                            resample=Image.BICUBIC)
        np.testing.assert_array_equal(view_array(photo, p, 24, policy.fill), np.asarray(want))
    assert 40 <= applied <= 90  # 128 layers at p = 0.5


# ----------------------------------------------------------------------------- the sampler against timm's


def _timm_rand_augment_draws(text: str, n: int) -> tuple[list, list, list]:
    """(op name, applied, level) of every layer of ``n`` calls of timm's RandAugment, seeded; the ops'
    pixel work is replaced by recording their arguments."""
    ra = taa.rand_augment_transform(text, {"translate_const": 100, "img_mean": (128, 128, 128)})
    names, applied, levels = [], [], []

    class Recorder:
        def __init__(self, op):
            self.op, self.name = op, op.name
            op.aug_fn = self.record

        def record(self, img, *args, **_):
            applied[-1] = True
            levels[-1] = args[0] if args else np.nan
            return img

        def __call__(self, img):
            names.append(self.name)
            applied.append(False)
            levels.append(np.nan)
            return self.op(img)

    ra.ops = [Recorder(op) for op in ra.ops]
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (4, 4))
    for _ in range(n):
        ra(img)
    return names, applied, levels


def test_rand_augment_sampler_matches_timms_distribution():
    n = 6000
    names, applied, args = _timm_rand_augment_draws("rand-m9-mstd0.5-inc1", n)
    ra = RandAugment.parse("rand-m9-mstd0.5-inc1")
    ours = sample_rand_augment(_keys(n), 0, 0, ra)
    our_names = [RA_OPS[o] for o in ours["ra_op"].reshape(-1)]
    assert set(our_names) == set(names) == set(ra.ops)
    # op frequencies: a two-sample chi-square over the 15 ops (12000 draws each)
    table = np.array([[names.count(o) for o in ra.ops], [our_names.count(o) for o in ra.ops]])
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
    # probability a layer applies: 0.5 for both
    assert abs(np.mean(applied) - 0.5) < 0.02 and abs(ours["ra_applied"].mean() - 0.5) < 0.02
    # magnitudes: timm's Rotate degrees against ours, same distribution (N(9, 0.5) clipped to 10, x3, signed)
    t_deg = np.array([a for nm, on, a in zip(names, applied, args) if on and nm == "Rotate"])
    mask = (ours["ra_op"] == RA_OPS.index("Rotate")) & ours["ra_applied"]
    o_deg = ours["ra_level"][mask].astype(np.float64) / 10 * 30
    assert stats.ks_2samp(np.abs(t_deg), np.abs(o_deg)).pvalue > 1e-3
    assert abs(np.mean(t_deg < 0) - 0.5) < 0.1 and abs(np.mean(o_deg < 0) - 0.5) < 0.1
    assert np.abs(o_deg).max() <= 30 + 1e-4 and abs(np.abs(o_deg).mean() - 27) < 0.5
    # an unsigned op never gets a negative level
    unsigned = np.isin(ours["ra_op"], [RA_OPS.index(o) for o in ("Equalize", "SolarizeAdd", "PosterizeIncreasing")])
    assert (ours["ra_level"][unsigned] >= 0).all()


def test_rand_augment_strings_are_parsed_as_timm_does():
    ra = RandAugment.parse("rand-m7-n3-p0.3-mstd101-mmax12")
    assert (ra.magnitude, ra.layers, ra.prob, ra.magnitude_std, ra.magnitude_max) == (7, 3, 0.3, math.inf, 12)
    assert ra.ops[4] == "Posterize" and RandAugment.parse("rand-m9-inc1").ops[4] == "PosterizeIncreasing"
    timm_ra = taa.rand_augment_transform("rand-m7-n3-p0.3", {})
    assert [op.name for op in timm_ra.ops] == list(RandAugment.parse("rand-m7-n3-p0.3").ops)
    for bad in ("augmix-m5", "ta_wide", "v0", "rand-m9-tweights", "rand-x3", "rand-n0", "rand-p2"):
        with pytest.raises(ValueError):
            RandAugment.parse(bad)


def _timm_erasing_boxes(n: int, size: int, prob: float, count: int) -> list:
    """The boxes timm's RandomErasing draws on ``n`` images, seeded (found by erasing a nan image)."""
    er = RandomErasing(probability=prob, mode="const", max_count=count if count > 1 else None, device="cpu")
    random.seed(1)
    out = []
    for _ in range(n):
        x = torch.full((3, size, size), float("nan"))
        er(x)
        out.append(int((x[0] == 0).sum()))
    return out


def test_erasing_sampler_matches_timms_distribution():
    n, size = 4000, 32
    t_area = np.array(_timm_erasing_boxes(n, size, 0.25, 1))
    policy = ViewPolicy(size=size, erase_prob=0.25, erase_mode="pixel")
    ours = sample_erasing(_keys(n), 0, 0, policy)
    box = ours["erase_box"].reshape(n, -1, 4)
    o_area = (box[:, 0, 2].astype(np.int64) * box[:, 0, 3])
    assert abs(np.mean(t_area > 0) - 0.25) < 0.025 and abs(np.mean(o_area > 0) - 0.25) < 0.025
    assert stats.ks_2samp(t_area[t_area > 0], o_area[o_area > 0]).pvalue > 1e-3
    on = box[:, 0, 2] > 0
    assert ((box[on, 0, 0] + box[on, 0, 2]) <= size).all() and ((box[on, 0, 1] + box[on, 0, 3]) <= size).all()


def test_erase_fills_each_box_with_its_seeded_noise():
    x = torch.zeros(3, 3, 8, 8)
    boxes = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [5, 5, 3, 3]], dtype=np.int16)
    seeds = np.array([7, 8, 9], dtype=np.uint32)
    erase(x, boxes, seeds, "pixel")
    want = torch.randn((3, 3, 4), generator=torch.Generator().manual_seed(7))
    assert torch.equal(x[0, :, 1:4, 2:6], want)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:4, 2:6] = False
    assert float(x[0][:, outside].abs().sum()) == 0.0  # nothing outside the box
    assert float(x[1].abs().sum()) == 0.0  # no box, no change
    assert torch.equal(x[2, :, 5:8, 5:8], torch.randn((3, 3, 3), generator=torch.Generator().manual_seed(9)))
    y = torch.ones(1, 3, 8, 8)
    erase(y, boxes[:1], seeds[:1], "const")
    assert float(y[0, :, 1:4, 2:6].abs().sum()) == 0.0 and float(y.sum()) == 3 * 64 - 3 * 12


# ----------------------------------------------------------------------------- color jitter and eval


def test_color_jitter_replay_equals_torchvision_in_the_stored_order(photo):
    policy = ViewPolicy(size=24, color_jitter=(0.4, 0.4, 0.4, 0.1))
    cols = sample_views(_keys(40), 0, 0, policy)
    orders = {tuple(o) for o in cols["cj_order"].tolist()}
    assert len(orders) > 10  # random orders, not one fixed order
    f = cols["cj_factor"]
    assert (f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (np.abs(f[:, 3]) <= 0.1).all()
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(40):
        p = {k: c[i] for k, c in cols.items()}
        top, left, h, w = crop_box(p, photo.width, photo.height)
        want = TF.resized_crop(photo, top, left, h, w, [24, 24], InterpolationMode.BILINEAR)
        for k in p["cj_order"]:
            want = adjust[k](want, float(p["cj_factor"][k]))
        np.testing.assert_array_equal(view_array(photo, p, 24), np.asarray(want))
    # eval views carry the jitter columns but are not jittered: pixels as without the policy
    plain = ViewPolicy(size=24)
    for policy_ in (policy, plain):
        assert len(val_views(1, policy_)) == len(policy_.fields())
    np.testing.assert_array_equal(view_array(photo, {k: c[0] for k, c in val_views(1, policy).items()}, 24),
                                  view_array(photo, {k: c[0] for k, c in val_views(1, plain).items()}, 24))


@pytest.mark.parametrize("shape", [(48, 60), (70, 40), (33, 33)])
def test_eval_view_equals_timms_eval_transform(photo, shape):
    img = photo.resize(shape)
    policy = ViewPolicy(size=24, crop_pct=0.875, eval_interpolation="bicubic")
    p = {k: c[0] for k, c in val_views(1, policy).items()}
    tf = create_transform(24, is_training=False, crop_pct=0.875, interpolation="bicubic")
    want = img
    for t in tf.transforms[:2]:  # Resize, CenterCrop (then ToTensor, Normalize)
        want = t(want)
    np.testing.assert_array_equal(view_array(img, p, 24), np.asarray(want))


# ----------------------------------------------------------------------------- config


def test_policy_config_errors_are_clear():
    with pytest.raises(PipelineError, match="leaves color jitter out"):
        config_from_dict(tiny_tree(**{"data.augment.auto_augment": "rand-m9", "data.augment.color_jitter": 0.4}))
    with pytest.raises(PipelineError, match="auto_augment"):
        config_from_dict(tiny_tree(**{"data.augment.auto_augment": "augmix-m5-w3"}))
    with pytest.raises(PipelineError, match="re_mode"):
        config_from_dict(tiny_tree(**{"data.augment.re_mode": "noise"}))
    cfg = config_from_dict(tiny_tree(**{f"data.augment.{k}": v for k, v in DEIT.items()}))
    policy = ViewPolicy.of(cfg.data)
    assert policy.rand_augment.ops == RandAugment.parse("rand-m9-inc1").ops and policy.erase_mode == "pixel"
    assert policy.fields()[-5:] == ("erase_box", "erase_seed", "mix_partner", "mix_lam", "mix_box")


# ----------------------------------------------------------------------------- a cache built with the policy


@pytest.fixture(scope="module")
def deit_cache(built, tmp_path_factory):
    """extract with the full DeiT policy and timm's eval transform (the tiny config otherwise)."""
    from pipeline.graph import Runner

    _, _, recs = built
    wd = copy_upstream(recs, tmp_path_factory.mktemp("deit") / "work", stages=("prepare",))
    tree = tiny_tree(**{f"data.augment.{k}": v for k, v in DEIT.items()})
    tree["data"]["eval"] = {"crop_pct": 0.875, "interpolation": "bicubic"}
    tree["data"]["mean"], tree["data"]["std"] = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tree["teacher"]["mean"], tree["teacher"]["std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # its own normalization
    cfg = config_from_dict(tree, workdir=str(wd))
    return cfg, Runner(cfg).run("extract"), tree


def _pixel_digest(cfg, cache, rows) -> str:
    ds = ViewDataset.for_config(cache.rows(), cfg.data)
    x, _, ok, idx = ds.batch(rows)
    assert bool(ok.all())
    return hashlib.sha256(ds.normalize(x, idx).numpy().tobytes()).hexdigest()


def test_full_policy_cache_replays_bit_identically_and_reproduces_its_targets(deit_cache):
    from cache.reader import open_cache
    from stages import models

    cfg, recs, tree = deit_cache
    cache = open_cache(recs["extract"])
    m = pq.read_table(cache.path / "manifest.parquet")
    assert m.schema.field("ra_op").metadata[b"codes"].decode().split(",") == list(RA_OPS)
    train = np.flatnonzero(np.asarray(m.column("split").to_pylist()) == "train")
    assert np.asarray(m.column("ra_applied").to_pylist()).any()
    erased = np.flatnonzero(np.asarray(m.column("erase_box").to_pylist())[:, 2] > 0)
    assert 0.15 < len(np.intersect1d(erased, train)) / len(train) < 0.35
    rng = np.random.default_rng(0)
    pick = np.sort(np.concatenate([rng.choice(train, 20, replace=False), erased[:4],
                                   np.flatnonzero(np.asarray(m.column("split").to_pylist()) == "val")[:4]]))
    here = _pixel_digest(cfg, cache, pick)
    assert here == _pixel_digest(cfg, cache, pick)  # a rerun
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from tests.test_augment import _pixel_digest;"
            "from pipeline.config import config_from_dict; from cache.reader import Cache;"
            "from pathlib import Path; import numpy as np;"
            "a = json.loads(sys.argv[2]); cfg = config_from_dict(a['tree'], workdir=a['wd']);"
            "print(_pixel_digest(cfg, Cache(a['cache']), np.array(a['rows'])))")


    arg = json.dumps({"tree": tree, "wd": str(cfg.workdir),
                      "cache": str(cache.path), "rows": pick.tolist()})
    other = subprocess.run([sys.executable, "-c", code, str(ROOT), arg], capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == here  # another process
    mixed = np.asarray(m.column("mix_lam").to_pylist())[train] < 1
    assert mixed.mean() > 0.9  # mix_prob 1: every train row but those whose cutmix box fell off the image
    partner = np.asarray(m.column("mix_partner").to_pylist())
    views = np.asarray(m.column("view").to_pylist())
    assert (views[partner[train]] == views[train]).all() and (partner[~np.isin(np.arange(len(m)), train)] == -1).all()
    # the teacher on the replayed views, normalized as the cache records, gives the cached targets
    assert cache.attrs["teacher"]["mean"] == [0.5] * 3 and cache.attrs["teacher"]["normalization"] == "teacher.mean/std"
    teacher = models.load_teacher(recs["teacher"], cfg)
    ds = ViewDataset.for_config(cache.rows(), cfg.data, models.teacher_normalization(cfg))
    x, _, _, idx = ds.batch(pick)
    with torch.inference_mode():
        logits, feats = models.intermediates(teacher, ds.normalize(x, idx), cfg.extract.layers)
    assert_reproduces_cached_targets(cache, pick, logits, feats)


# ----------------------------------------------------------------------------- each model's normalization


def test_teacher_normalization_comes_from_config_pretrained_cfg_or_data():
    from stages.models import teacher_normalization

    cfg = config_from_dict(tiny_tree())
    assert teacher_normalization(cfg).source == "data.mean/std" and teacher_normalization(cfg).mean == (0.5,) * 3
    clip = config_from_dict(tiny_tree(**{"teacher.model": "vit_base_patch16_clip_224", "teacher.kwargs": {},
                                         "teacher.pretrained": True}))
    n = teacher_normalization(clip)
    assert n.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and "pretrained_cfg" in n.source
    cait = config_from_dict(tiny_tree(**{"teacher.pretrained": True}))
    assert teacher_normalization(cait).std == pytest.approx((0.229, 0.224, 0.225))
    own = config_from_dict(tiny_tree(**{"teacher.pretrained": True, "teacher.mean": [0.1, 0.2, 0.3],
                                        "teacher.std": [1, 1, 1]}))
    assert teacher_normalization(own).mean == (0.1, 0.2, 0.3)
    with pytest.raises(PipelineError, match="go together"):
        config_from_dict(tiny_tree(**{"teacher.mean": [0.1, 0.2, 0.3]}))


def test_online_teacher_gets_the_batch_normalized_as_extract_normalizes_it(deit_cache):
    """An online teacher whose normalization differs from the student's sees the batch's pixels
    normalized with its own mean and std, then erased and mixed: what extract feeds it."""
    from cache.reader import open_cache
    from stages import models
    from stages.trainer import Trainer
    from stages.train import optimizer

    cfg, recs, _ = deit_cache
    cache = open_cache(recs["extract"])
    st = cfg.student("spectral").model_copy(update={"mode": "online"})
    teacher = models.load_teacher(recs["teacher"], cfg)
    tr = Trainer(cfg, st, cache, Path("/nonexistent"), teacher=teacher)
    batches = tr.train_batches(0)
    x, _, rows, extras = next(iter(batches))
    raw, _, _, idx = batches.dataset.batch(rows.numpy())
    assert raw.ndim == 5  # mixing: each row's view and its partner's
    as_teacher = batches.dataset.normalized_as(models.teacher_normalization(cfg)).normalize(raw, idx)
    torch.testing.assert_close(extras["teacher_x"], as_teacher, rtol=0, atol=0)
    torch.testing.assert_close(x, batches.dataset.normalize(raw, idx), rtol=0, atol=0)
    assert not torch.equal(x, extras["teacher_x"])
    # a step with the live teacher takes its targets from that input
    live = Trainer(cfg, st, cache, Path("/nonexistent"), teacher=teacher)
    seen = []
    live.targets_online = lambda inp, f=live.targets_online: seen.append(inp) or f(inp)
    xb, yb, rb, ex = next(iter(live.train_batches(0)))
    terms = live.step(xb, batches.dataset.label_targets(yb, rb, 10), ex, optimizer(live.model, "adamw", 1e-3, 0.05))
    assert np.isfinite(terms["total"]) and torch.equal(seen[0], ex["teacher_x"])
    # the same normalization: no second input
    same = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"mean": None, "std": None})})
    same = same.model_copy(update={"data": cfg.data.model_copy(update={"mean": (0.5,) * 3, "std": (0.5,) * 3})})
    tr2 = Trainer(same, st, cache, Path("/nonexistent"), teacher=teacher)
    assert "teacher_x" not in next(iter(tr2.train_batches(0)))[3]


# ----------------------------------------------------------------------------- mixup and cutmix


def test_mixing_sampler_matches_timms_mixup_per_element():
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam

    n, size = 5000, 32
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=10)
    np.random.seed(0)
    t_lam, t_cut = timm_mix._params_per_elem(n)
    t_cut_lam = np.array([cutmix_bbox_and_lam((3, size, size), float(lam))[1] for lam in t_lam[t_cut]])
    policy = ViewPolicy(size=size, mixup=0.8, cutmix=1.0)
    ours = sample_views(_keys(n), 0, 0, policy)
    o_cut = ours["mix_box"][:, 2] > 0
    assert abs(t_cut.mean() - 0.5) < 0.03 and abs(o_cut.mean() - 0.5) < 0.03
    blend = (~o_cut) & (ours["mix_lam"] < 1)
    assert stats.ks_2samp(t_lam[~t_cut], ours["mix_lam"][blend]).pvalue > 1e-3
    assert stats.ks_2samp(t_cut_lam, ours["mix_lam"][o_cut]).pvalue > 1e-3
    box = ours["mix_box"].astype(np.int64)
    np.testing.assert_allclose(ours["mix_lam"][o_cut], 1 - box[o_cut, 2] * box[o_cut, 3] / size**2, rtol=1e-6)
    assert (ours["mix_partner"] >= 0).all() and (ours["mix_partner"] < n).all()
    # the partner is chosen by key, not by position: the same keys in another order pick the same partners
    keys = _keys(n)
    perm = np.random.default_rng(1).permutation(n)
    again = sample_views(keys[perm], 0, 0, policy)
    np.testing.assert_array_equal(keys[perm][again["mix_partner"]], keys[ours["mix_partner"]][perm])


def test_mixed_rows_are_the_declared_mix_of_two_replayed_views(built):
    from cache.reader import open_cache
    from cache.rows import Rows
    from stages.data import normalize, view_pixels
    from stages.views import place_block

    cfg, _, recs = built
    base = open_cache(recs["extract"]).rows()
    n, size = 48, cfg.data.image_size
    policy = ViewPolicy(size=size, hflip=0.5, mixup=0.8, cutmix=1.0, erase_prob=0.5, erase_mode="pixel",
                        mean=cfg.data.mean)
    sample = base.sample[100 : 100 + n]
    params = place_block(sample_views(base.samples.key_hashes()[sample], 0, 0, policy), 5)
    rows = Rows(base.samples, np.concatenate([base.sample[:5], sample]),
                {k: np.concatenate([neutral[:5], v]) for (k, v), neutral in
                 zip(params.items(), val_views(5, policy).values())})
    ds = ViewDataset(rows, size, cfg.data.mean, cfg.data.std, policy=policy)
    idx = np.arange(5, 5 + n)
    x, y, ok, _ = ds.batch(idx)
    assert x.shape == (n, 2, 3, size, size) and bool(ok.all())
    got = ds.normalize(x, idx)
    target = ds.label_targets(y, idx, 10)
    reader = ImageReader()

    def alone(r: int) -> torch.Tensor:  # one row's view, normalized and erased, built on its own
        s = rows.source(r)
        img = decode_image(reader.read(s.url, s.offset, s.size))
        v = normalize(view_pixels(img, rows.view_params(r), size, policy.fill), cfg.data.mean, cfg.data.std)[None]
        return erase(v, rows.params["erase_box"][[r]], rows.params["erase_seed"][[r]], "pixel")[0]

    kinds = set()
    for j, r in enumerate(idx):
        p = int(rows.params["mix_partner"][r])
        assert 5 <= p < 5 + n  # a row of the same block
        a, b = alone(r), alone(p)
        lam = float(rows.params["mix_lam"][r])
        top, left, h, w = rows.params["mix_box"][r].tolist()
        if h > 0:
            kinds.add("cutmix")
            want = a.clone()
            want[:, top : top + h, left : left + w] = b[:, top : top + h, left : left + w]
            torch.testing.assert_close(got[j], want, rtol=0, atol=0)
            assert lam == pytest.approx(1 - h * w / size**2, rel=1e-6)
        else:
            kinds.add("mixup")
            torch.testing.assert_close(got[j], lam * a + (1 - lam) * b, rtol=1e-6, atol=1e-6)
        want_y = torch.zeros(10)
        want_y[int(rows.labels([r])[0])] += lam
        want_y[int(rows.labels([p])[0])] += 1 - lam
        torch.testing.assert_close(target[j], want_y, rtol=1e-6, atol=1e-7)
    assert kinds == {"cutmix", "mixup"}
    # rows without a partner (val) are neither mixed nor given mixed labels
    x0, y0, _, _ = ds.batch(range(5))
    torch.testing.assert_close(ds.normalize(x0, range(5)), normalize(x0[:, 0], cfg.data.mean, cfg.data.std))
    torch.testing.assert_close(ds.label_targets(y0, range(5), 10), torch.nn.functional.one_hot(y0, 10).float())


def test_mixed_label_loss_equals_timms_mixup_target_and_soft_cross_entropy():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    from losses import StudentOutputs, TeacherTargets
    from losses.spectralkd import SpectralKD, SpectralKDConfig

    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    lam = 0.3
    soft = lam * torch.nn.functional.one_hot(y, 10).float() + (1 - lam) * torch.nn.functional.one_hot(y.flip(0), 10)
    none = SpectralKD(SpectralKDConfig(kind="none", label_smoothing=0.1))
    ours = none(StudentOutputs(z), TeacherTargets(), soft)["total"]
    want = SoftTargetCrossEntropy()(z, mixup_target(y, 10, lam, smoothing=0.1))
    assert ours.item() == pytest.approx(want.item(), rel=1e-6)
    # and in float64 numpy: the lam-weighted smoothed cross-entropies
    ls = np.log(np.exp(z.double().numpy()).sum(1))
    logp = z.double().numpy() - ls[:, None]
    t = soft.double().numpy() * 0.9 + 0.01
    assert ours.item() == pytest.approx(float(-(t * logp).sum(1).mean()), rel=1e-6)


def test_the_public_dataset_gives_a_mixed_caches_items_as_the_trainer_batches_them(deit_cache):
    """spectralkd.CacheDataset on a mixed, erased, RandAugmented cache: each item's view, mixed label
    and targets equal the pipeline trainer's batch of the same rows."""
    import spectralkd
    from cache.reader import open_cache
    from stages.trainer import Trainer
    from tests.conftest import trainer_batch

    cfg, recs, _ = deit_cache
    cache = open_cache(recs["extract"])
    tr = Trainer(cfg, cfg.student("spectral"), cache, Path("/nonexistent"))
    ds = spectralkd.CacheDataset(cache, cfg.data, layers=tr.t_layers, widths=tr.widths)
    items = [ds[i] for i in range(16)]
    x, y, rows, targets = trainer_batch(tr, np.array([it["row"] for it in items]))
    assert rows.tolist() == [it["row"] for it in items]
    assert torch.equal(torch.stack([it["x"] for it in items]), x)
    got_y = torch.stack([it["y"] for it in items])
    assert got_y.shape == (16, 10) and torch.equal(got_y, y) and (got_y.max(1).values < 1).any()  # two labels
    for k, v in targets.items():
        assert torch.equal(torch.stack([it["targets"][k] for it in items]), v.float()), k


def test_a_student_steps_on_a_mixed_cache(deit_cache):
    from cache.reader import open_cache
    from stages.trainer import Trainer
    from stages.train import optimizer

    cfg, recs, _ = deit_cache
    cache = open_cache(recs["extract"])
    tr = Trainer(cfg, cfg.student("spectral"), cache, Path("/nonexistent"))
    batches = tr.train_batches(0)
    x, y, rows, targets = next(iter(batches))
    soft = batches.dataset.label_targets(y, rows, cfg.data.num_classes)
    assert soft.shape == (len(y), 10) and torch.allclose(soft.sum(1), torch.ones(len(y)))
    assert (soft.max(1).values < 1).any()  # some rows carry two labels
    terms = tr.step(x, soft, targets, optimizer(tr.model, "adamw", 1e-3, 0.05))
    assert np.isfinite(terms["total"]) and terms["spectral"] > 0 and terms["kd"] > 0
