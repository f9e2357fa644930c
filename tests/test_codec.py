"""The cache's spectrum encodings (cache.codec): Hermitian packing is lossless, int8 stays within the
bound it declares, pooled caches serve their declared width only, and every encoded array is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.codec import decode, encode, encoded_shapes, hermitian_maps, pack, unpack
from cache.features import FeatureStore
from cache.reader import cache_path, open_cache
from cache.verify import verify_cache
from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from stages.analyze import write_cached_teacher_layers
from stages.spectral import pool_channels
from tests.conftest import copy_upstream, tiny_tree

F16_EPS = 2.0 ** -11  # float16 unit roundoff


def _decoded(parts: dict, h: int, w: int, quantize: str) -> torch.Tensor:
    """What a reader gets back from encoded parts (as numpy arrays, as read from disk)."""
    out = decode({k: v.numpy() for k, v in parts.items()}, h, w, packed=True, quantize=quantize)
    assert out.dtype == np.float16
    return torch.from_numpy(out)


def _rfft2_f64(x: np.ndarray) -> np.ndarray:
    """Independent reference: numpy's float64 rfft2 (ortho) as (..., H, W//2+1, 2)."""
    s = np.fft.rfft2(x, norm="ortho")
    return np.stack([s.real, s.imag], axis=-1)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 15), w=st.integers(1, 15), seed=st.integers(0, 2**31 - 1))
def test_packing_keeps_exactly_the_free_numbers(h, w, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w))
    dense = torch.from_numpy(_rfft2_f64(x))
    packed = pack(dense, w)
    assert packed.shape == (2, 3, h * w)  # H*W real degrees of freedom, no more
    back = unpack(packed.numpy(), h, w)
    np.testing.assert_allclose(back, dense.numpy(), rtol=0, atol=1e-12)
    # the packed numbers alone determine the map
    recon = np.fft.irfft2(back[..., 0] + 1j * back[..., 1], s=(h, w), norm="ortho")
    np.testing.assert_allclose(recon, x, rtol=0, atol=1e-12)


def test_hermitian_maps_count_and_mirror():
    keep, source, sign = hermitian_maps(4, 4)
    assert len(keep) == 16 and len(source) == 4 * 3 * 2
    dense = np.arange(24).reshape(4, 3, 2)
    # DC and the (2, 0), (0, 2), (2, 2) bins are real: their imaginary parts read as zero
    for r, k in [(0, 0), (2, 0), (0, 2), (2, 2)]:
        assert source[dense[r, k, 1]] == 16
    # (3, 0) mirrors (1, 0): same real part, negated imaginary part
    assert keep[source[dense[3, 0, 0]]] == dense[1, 0, 0] and sign[dense[3, 0, 0]] == 1
    assert keep[source[dense[3, 0, 1]]] == dense[1, 0, 1] and sign[dense[3, 0, 1]] == -1


def test_packing_float16_spectra_within_rounding():
    """Spectra computed in float32 and stored float16: kept numbers are bit-exact, mirrored ones
    differ from the dense layout's by float16 rounding at most."""
    from stages.spectral import spectrum

    x = torch.randn(64, 32, 4, 4) * 3
    d16 = spectrum(x).half()
    back = _decoded(encode(d16.float(), 4, packed=True, quantize="none"), 4, 4, "none")
    keep, _, _ = hermitian_maps(4, 4)
    flat_b, flat_d = back.reshape(64, 32, -1), d16.reshape(64, 32, -1)
    assert torch.equal(flat_b[..., keep], flat_d[..., keep])
    err = (back.float() - d16.float()).abs()
    assert bool((err <= d16.float().abs() * 2 * F16_EPS + 2 ** -24 * 4).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tail=st.sampled_from(["normal", "cauchy", "zero-channel"]),
       h=st.integers(1, 8), w=st.integers(1, 8))
def test_int8_error_within_declared_bound_on_random_maps(seed, tail, h, w):
    rng = np.random.default_rng(seed)
    x = rng.standard_cauchy((8, 6, h, w)) if tail == "cauchy" else rng.standard_normal((8, 6, h, w)) * 10
    if tail == "zero-channel":
        x[:, 2] = 0
    dense = torch.from_numpy(_rfft2_f64(x)).float()
    parts = encode(dense, w, packed=True, quantize="int8")
    assert parts["values"].dtype == torch.int8 and parts["scale"].dtype == torch.float16
    absmax = pack(dense, w).reshape(*parts["scale"].shape, -1).abs().amax(dim=-1)
    refused = ~torch.isfinite(parts["scale"])  # what extract's non-finite check refuses
    assert bool(refused[absmax > 65504].all()) and not bool(refused[absmax < 65000].any())  # float16's range
    if refused.any():
        return
    got = _decoded(parts, h, w, "int8").float()
    want = pack(dense, w)
    err = (pack(got, w) - want).abs()
    bound = parts["scale"].float().unsqueeze(-1) / 2 + want.abs() * F16_EPS * 1.01 + 1e-30
    assert bool((err <= bound).all()), float((err - bound).max())
    assert torch.isfinite(got).all()


def test_int8_error_within_bound_on_teacher_features(built):
    cfg, runner, recs = built
    cache = open_cache(recs["extract"])
    for layer in cache.spec.layers:
        dense = torch.from_numpy(cache.read_layer("spectra", layer.index, 0, 256)).float()
        parts = encode(dense, layer.width, packed=True, quantize="int8")
        got = pack(_decoded(parts, layer.height, layer.width, "int8").float(), layer.width)
        want = pack(dense, layer.width)
        bound = parts["scale"].float().unsqueeze(-1) / 2 + want.abs() * F16_EPS * 1.01
        assert bool(((got - want).abs() <= bound).all())
        rel = float((got - want).norm() / want.norm())
        assert 0 < rel < 0.02  # int8 is lossy, and not wildly so


def test_encoded_shapes_match_encode():
    dense = torch.randn(3, 5, 4, 3, 2)
    for packed in (True, False):
        for q in ("none", "int8"):
            parts = encode(dense, 4, packed, q)
            shapes = encoded_shapes(5, 4, 4, packed, q)
            assert set(parts) == set(shapes)
            for k, (shape, dtype) in shapes.items():
                assert tuple(parts[k].shape[1:]) == shape and str(parts[k].dtype).endswith(dtype)


# ----------------------------------------------------------------------------- through the pipeline


def _extract(recs, wd, **changes):
    copy_upstream(recs, wd, stages=("prepare", "teacher"))
    cfg = config_from_dict(tiny_tree(**changes), workdir=str(wd))
    runner = Runner(cfg)
    return cfg, runner, runner.run("extract")


def test_dense_and_packed_caches_hold_the_same_spectra(built, tmp_path):
    _, _, recs = built
    packed = open_cache(recs["extract"])
    _, _, recs2 = _extract(recs, tmp_path / "w", **{"extract.compress.packed": False})
    dense = open_cache(recs2["extract"])
    g = zarr.open_group(str(cache_path(recs2["extract"])), mode="r")
    for layer in packed.spec.layers:
        stored = g[f"spectra/{layer.name}"]
        assert stored.shape == (dense.spec.rows, 32, 4, 3, 2)
        a = packed.read_layer("spectra", layer.index, 0, packed.spec.rows).astype(np.float32)
        b = dense.read_layer("spectra", layer.index, 0, dense.spec.rows).astype(np.float32)
        keep, _, _ = hermitian_maps(layer.height, layer.width)
        n = len(a)
        assert np.array_equal(a.reshape(n, 32, -1)[..., keep], b.reshape(n, 32, -1)[..., keep])
        assert np.all(np.abs(a - b) <= np.abs(b) * 2 * F16_EPS + 2.0 ** -22)
    # float16 spectra are compressed by blosc-lz4 over bit-shuffled values (extract.compressor: auto)
    for c in (packed, dense):
        assert c.spec.compressor == "blosc-lz4"
        codec = c.array(f"spectra/{packed.spec.layers[0].name}").metadata.to_dict()["codecs"][0]
        inner = codec["configuration"]["codecs"][1]
        assert inner["name"] == "blosc" and inner["configuration"]["cname"] == "lz4"
        assert inner["configuration"]["shuffle"] == "bitshuffle"
    # 1.5x fewer numbers at 4x4: the packed spectra take fewer bytes on disk
    size = {c: sum(f.stat().st_size for f in (c.path / "spectra").rglob("*") if f.is_file()) for c in (packed, dense)}
    assert size[packed] < size[dense] * 0.8


def test_pooled_int8_cache_trains_its_width_for_every_form_and_refuses_others(built, tmp_path):
    _, _, recs = built
    cfg, runner, recs2 = _extract(recs, tmp_path / "w", **{"extract.compress.pool": 16,
                                                           "extract.compress.quantize": "int8"})
    cache = open_cache(recs2["extract"])
    g = zarr.open_group(str(cache.path), mode="r")
    assert g.attrs["spec"]["quantize"] == "int8"
    assert g.attrs["spec"]["compressor"] == "zstd"  # auto: int8 values compress better with zstd
    for layer in cache.spec.layers:
        assert layer.pooled == 16
        assert g[f"spectra/{layer.name}"].shape == (cache.spec.rows, 16, 16)
        assert g[f"spectra/{layer.name}"].dtype == np.int8
        assert g[f"spectra_scale/{layer.name}"].shape == (cache.spec.rows, 16)
        got = cache.read_layer("spectra", layer.index, 0, 64)
        assert got.shape == (64, 16, 4, 3, 2) and got.dtype == np.float16
    # the pooled, quantized targets are close to the pooled exact ones
    exact = open_cache(recs["extract"])
    t = cache.spec.layers[1].index
    want = pool_channels(torch.from_numpy(exact.read_layer("spectra", t, 0, 256)).float(), 16)
    got = torch.from_numpy(cache.read_layer("spectra", t, 0, 256)).float()
    assert float((got - want).norm() / want.norm()) < 0.02
    # analyze takes lossy teacher layers from a forward pass, lossless ones from the cache
    val = cache.block("val")
    rows = (val.start, val.start + 40)
    assert write_cached_teacher_layers(FeatureStore.create(tmp_path / "f1.zarr"), cache, rows, 256) == []
    assert write_cached_teacher_layers(FeatureStore.create(tmp_path / "f2.zarr"), exact, rows, 256) == [0, 3]
    # the width-16 students train from it: SpectralKD on the spectra, FitNets on their irfft2 (its
    # regressor maps to the stored 16 channels)
    def student(name: str, width: int, kind: str) -> dict:
        return {"name": name, "model": "deit_tiny_patch16_224",
                "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": width, "depth": 2, "num_heads": 2},
                "pairs": [[0, 0], [1, 3]], "loss": {"kind": kind}}

    tree = tiny_tree(**{"extract.compress.pool": 16, "extract.compress.quantize": "int8"})
    tree["distill"]["students"] += [student("fitnets", 16, "fitnets"), student("narrow", 8, "spectral"),
                                    student("narrow_fitnets", 8, "fitnets")]
    cfg3 = config_from_dict(tree, workdir=str(tmp_path / "w"))
    Runner(cfg3, {"students": ["spectral", "fitnets"]}).run("distill")
    assert (runner.student_dir("spectral") / "final.pt").exists()
    final = torch.load(Runner(cfg3).student_dir("fitnets") / "final.pt", weights_only=True)
    assert [tuple(final["loss_state_dict"][f"regressors.{i}.weight"].shape[:2]) for i in (0, 1)] == [(16, 16)] * 2
    # a student of another width is refused before training, naming the option, whatever its loss
    for name in ("narrow", "narrow_fitnets"):
        with pytest.raises(PipelineError, match=r"pooled to 16 channels \(extract.compress.pool\).*this one has 8"):
            Runner(cfg3, {"students": [name]}).run("distill")
        assert not (Runner(cfg3).student_dir(name) / "final.pt").exists()


def test_verify_checks_scale_arrays(built, tmp_path):
    _, _, recs = built
    _, _, recs2 = _extract(recs, tmp_path / "w", **{"extract.compress.quantize": "int8"})
    cache = open_cache(recs2["extract"])
    name = f"spectra_scale/{cache.spec.layers[0].name}"
    f = cache.shard_file(name, 1)
    b = bytearray(f.read_bytes())
    b[20] ^= 0xFF
    f.write_bytes(bytes(b))
    problems = verify_cache(cache.path, recs2["extract"].lock["fingerprint"])
    assert any(name in p and "shard 1" in p for p in problems), problems
    with pytest.raises(PipelineError, match=rf"{name}: shard 1 is corrupt"):
        open_cache(recs2["extract"]).read_layer("spectra", cache.spec.layers[0].index, 256, 300)


def test_pool_config_errors(built, tmp_path):
    with pytest.raises(ConfigError, match=r"compress.pool: 3 widths for 2 layers"):
        config_from_dict(tiny_tree(**{"extract.compress.pool": [8, 8, 8]}), workdir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"extract.compress.pool: 0 is not allowed"):
        config_from_dict(tiny_tree(**{"extract.compress.pool": 0}), workdir=str(tmp_path))
    _, _, recs = built
    with pytest.raises(PipelineError, match=r"extract.compress.pool: 64 channels for layer 0 .* only 32"):
        _extract(recs, tmp_path / "w", **{"extract.compress.pool": 64})
