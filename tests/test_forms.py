"""A cached teacher layer in either form: feature maps from a spectral cache (irfft2) equal the
teacher's own forward within float16 rounding, a features cache serves spectral students (rfft2 at
read time), and both caches give a student the same targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import open_cache
from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from stages import models
from stages.data import ImageReader, build_view, decode_image
from stages.trainer import Trainer
from tests.conftest import copy_upstream, tiny_tree


def _views(cfg, cache, rows: np.ndarray) -> torch.Tensor:
    """The normalized views of cache rows ``rows``, rebuilt from their stored parameters."""
    table, reader = cache.rows(), ImageReader()
    return torch.stack([build_view(decode_image(reader.read(table.source(r).url, table.source(r).offset,
                                                            table.source(r).size)),
                                   table.view_params(r), cfg.data.image_size, cfg.data.mean, cfg.data.std)
                        for r in rows])


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def test_features_from_a_spectral_cache_equal_the_teachers_forward(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    assert "features" not in cache.spec.store
    teacher = models.load_teacher(recs["teacher"], cfg)
    val = cache.block("val")
    rows = np.arange(val.start, val.start + 16)
    with torch.inference_mode():
        _, feats = models.intermediates(teacher, _views(cfg, cache, rows), cfg.extract.layers)
    for layer, f in zip(cache.spec.layers, feats):
        got = cache.read_layer("features", layer.index, int(rows[0]), int(rows[-1]) + 1)
        assert got.shape == tuple(f.shape) and got.dtype == np.float32
        assert rel_error(got, f.double().numpy()) < 1e-3  # float16 spectra: ~2^-11 relative per value
        assert rel_error(got, np.zeros_like(got) + f.double().numpy().mean()) > 0.1  # and not a constant


def test_a_features_cache_serves_spectral_students_with_the_spectral_caches_targets(built, tmp_path):
    cfg, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w", stages=("prepare", "teacher"))
    fcfg = config_from_dict(tiny_tree(**{"extract.store": ["logits", "features"]}), workdir=str(wd))
    frecs = Runner(fcfg).run("extract")
    features, spectral = open_cache(frecs["extract"]), open_cache(recs["extract"])
    assert "spectra" not in features.spec.store
    for layer in spectral.spec.layers:
        a = features.read_layer("spectra", layer.index, 0, 64)
        b = spectral.read_layer("spectra", layer.index, 0, 64)
        assert a.shape == b.shape and rel_error(a, b.astype(np.float64)) < 2e-3
        f = features.read_layer("features", layer.index, 0, 64)
        assert f.dtype == np.float16 and rel_error(spectral.read_layer("features", layer.index, 0, 64),
                                                   f.astype(np.float64)) < 2e-3
    # a spectral student trains from it: its targets are the spectral cache's within float16 rounding
    st = fcfg.student("spectral")
    got = next(iter(Trainer(fcfg, st, features, Path("/nonexistent")).train_batches(0)))
    want = next(iter(Trainer(cfg, cfg.student("spectral"), spectral, Path("/nonexistent")).train_batches(0)))
    assert torch.equal(got[2], want[2])  # the same rows in the same order: the manifests agree
    for t in (0, 3):
        assert rel_error(got[3][t].numpy(), want[3][t].double().numpy()) < 2e-3
    # a cache that stores no teacher layer at all names that when a layer is asked of it
    bare_wd = copy_upstream(recs, tmp_path / "x", stages=("prepare", "teacher"))
    bare = config_from_dict(tiny_tree(**{"extract.store": ["logits"], "distill.students[1].loss.kind": "logits"}),
                            workdir=str(bare_wd))
    with pytest.raises(PipelineError, match=r"stores no teacher layers \(extract.store = \['logits'\]\)"):
        open_cache(Runner(bare).run("extract")["extract"]).read_layer("features", 0, 0, 4)


def test_decoding_on_the_device_equals_the_readers_decoding(built):
    """A GPU student's targets: the stored parts read, then unpacked on its device (here CPU tensors)
    equal the reader thread's numpy decoding bit for bit, and its batches are the same."""
    from stages.batches import CachedBatches, StudentTargets

    cfg, _, recs = built
    cache = open_cache(recs["extract"])
    layers = tuple(layer.index for layer in cache.spec.layers)
    host = StudentTargets(cache, logits=True, layers=layers)
    device = StudentTargets(cache, logits=True, layers=layers, decode_on=torch.device("cpu"))
    assert device.decodes_on_device and not host.decodes_on_device
    raw = device.read(0, 256)
    assert set(raw) == {"logits", "encoded"} and all(set(p) == {"values"} for p in raw["encoded"].values())
    a, b = host.tensors(host.read(0, 256)), device.tensors(raw)
    assert set(a) == set(b) == {"logits", *layers}
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    block = cache.block("train", 0)
    got = next(iter(CachedBatches(device, Trainer(cfg, cfg.student("spectral"), cache, Path("/x")).dataset,
                                  (block.start, block.stop), 64, seed=3, shuffle=True)))
    want = next(iter(CachedBatches(host, Trainer(cfg, cfg.student("spectral"), cache, Path("/x")).dataset,
                                   (block.start, block.stop), 64, seed=3, shuffle=True)))
    assert torch.equal(got[2], want[2]) and all(torch.equal(got[3][k], want[3][k]) for k in want[3])
