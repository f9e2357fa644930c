"""The calibrated encodings (cache.codec 'step', delta chains): each value within half its step, the
tables fitted to the declared error, every decoder equal to its torch twin on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.codec import (STEP_LIMIT, StepOverflow, basis_matrix, calibrate_steps, decode, decode_layers_torch,
                         decode_torch, dequantize_steps, encode, encode_basis, encode_step, fit_basis, pack,
                         packed_weights, quantize_steps, unzigzag, zigzag)
from cache.layout import CacheSpec, LayerSpec
from cache.reader import open_cache
from pipeline.config import ConfigError, config_from_dict
from pipeline.graph import Runner
from tests.conftest import copy_upstream, tiny_tree

STEP = {"extract.compress.quantize": "step", "extract.compress.error": 0.05, "extract.compress.delta": True,
        "extract.compress.calibrate_rows": 200}


def _dense(seed: int, shape=(3, 4, 5, 6)) -> torch.Tensor:
    """float32 rfft2 half-spectra (B, C, H, W//2+1, 2) of random maps (numpy float64, independent)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    s = np.fft.rfft2(x, norm="ortho")
    return torch.from_numpy(np.stack([s.real, s.imag], axis=-1)).float()


@settings(max_examples=25, deadline=None)
@given(q=st.lists(st.integers(-STEP_LIMIT, STEP_LIMIT), min_size=1, max_size=50))
def test_zigzag_round_trips_and_orders_by_magnitude(q):
    u = zigzag(torch.tensor(q, dtype=torch.int32))
    assert u.dtype == torch.uint16
    np.testing.assert_array_equal(unzigzag(u.numpy()), np.array(q))
    mags = np.abs(np.array(q))
    assert np.all(u.numpy().astype(np.int64) <= 2 * mags)  # small magnitudes leave the high bits zero


def test_packed_weights_are_the_dense_loss_metric():
    """Sum of w * packed^2 equals the sum of squares of the dense half-spectrum (float64)."""
    for h, w in [(4, 4), (5, 6), (14, 14), (3, 1)]:
        dense = _dense(h * w, (2, 3, h, w)).double()
        p = pack(dense, w).numpy()
        np.testing.assert_allclose((p ** 2 * packed_weights(h, w)).sum(), (dense.numpy() ** 2).sum(), rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_step_values_stay_within_half_a_step(seed, scale):
    x = (_dense(seed) * scale).to(torch.float16).float()
    p = pack(x, 6)
    steps = torch.from_numpy(np.random.default_rng(seed).uniform(0.01, 0.5, 5 * 6).astype(np.float32)) * scale
    u, recon = quantize_steps(p, steps)
    back = dequantize_steps(u.numpy(), steps.numpy())
    np.testing.assert_array_equal(back, recon.numpy())
    err = np.abs(back.astype(np.float64) - p.numpy().astype(np.float64))
    assert np.all(err <= steps.numpy().astype(np.float64) / 2 * (1 + 1e-6))


def test_a_value_past_the_integer_range_is_refused():
    with pytest.raises(StepOverflow):
        quantize_steps(torch.tensor([[1.0e6]]), torch.tensor([1.0]))


@pytest.mark.parametrize("error", [0.003, 0.05, 0.3])
def test_calibrated_tables_meet_the_declared_error(error):
    """Relative RMS error in the loss's metric, recomputed in float64 from the decoded values: at
    most the declared error, and near it (the step is as large as the bound allows)."""
    h, w = 5, 6
    x = pack(_dense(1, (64, 8, h, w)).to(torch.float16).float(), w).numpy() * np.linspace(0.01, 3, 8)[:, None]
    x = x.astype(np.float32)
    steps = calibrate_steps(x, h, w, error)
    wts = packed_weights(h, w)
    np.testing.assert_allclose(steps * np.sqrt(wts), steps[0] * np.sqrt(wts[0]), rtol=1e-6)  # uniform in the metric
    recon = np.round(x / steps) * steps
    got = np.sqrt(((x.astype(np.float64) - recon) ** 2 * wts).sum() / ((x.astype(np.float64) ** 2) * wts).sum())
    assert 0.8 * error <= got <= error


def test_delta_chain_bounds_each_layer_by_its_own_steps():
    """Closed loop: a delta-coded layer's decoded values are within half its steps of its own
    values, however many layers precede it."""
    h, w = 4, 4
    layers = [_dense(0, (5, 3, h, w))]
    for i in range(3):  # a residual stream: each layer the previous plus a small update
        layers.append(layers[-1] + 0.1 * _dense(i + 1, (5, 3, h, w)))
    base = None
    for dense in layers:
        p = pack(dense.to(torch.float16).float(), w)
        steps = np.full(h * w, 0.05, dtype=np.float32)
        parts, recon = encode_step(dense, w, steps, base)
        got = decode({k: v.numpy() for k, v in parts.items()}, h, w, True, "step", steps,
                     None if base is None else base.numpy())
        assert np.all(np.abs(recon.numpy() - p.numpy()) <= 0.025 * (1 + 1e-6))
        # the dense float16 a reader gets is the decoded packed values, rounded once
        np.testing.assert_array_equal(got, decode({"values": recon.to(torch.float16).numpy()}, h, w, True, "none"))
        base = recon


@pytest.mark.parametrize("quantize,packed,basis", [("none", True, False), ("none", False, False),
                                                   ("int8", True, False), ("step", True, False), ("step", True, True)])
def test_torch_decoder_equals_numpy_decoder(quantize, packed, basis):
    """decode_torch on CPU tensors gives the numpy decoder's float16 bits (CUDA: benchmarks/gpu_check.sh)."""
    h, w = 5, 6
    dense = _dense(7, (4, 3, h, w)) * 3
    steps = np.full(h * w, 0.02, dtype=np.float32) / np.sqrt(packed_weights(h, w)).astype(np.float32)
    base = pack(_dense(8, (4, 3, h, w)).to(torch.float16).float(), w) if quantize == "step" else None
    b = encode_basis(np.linalg.qr(np.random.default_rng(3).standard_normal((3, 3)))[0]) if basis else None
    if quantize == "step":
        parts = encode_step(dense, w, steps, base, b)[0]
    else:
        parts = encode(dense, w, packed, quantize)
    want = decode({k: v.numpy() for k, v in parts.items()}, h, w, packed, quantize, steps,
                  None if base is None else base.numpy(), b)
    got, _ = decode_torch(parts, h, w, packed, quantize, steps, base, b)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy().view(np.uint16), want.view(np.uint16))


def test_channel_basis_keeps_the_declared_error_and_compacts_correlated_channels():
    """Channels mixed from 2 sources: the fitted basis is orthonormal, its first 2 components hold
    nearly all the energy, each component is within half its step, and the layer's relative error
    (float64, in the loss's metric) stays within the declared one."""
    from cache.encoding import calibrated_spec, encoded_layers

    h, w, c = 4, 4, 6
    rng = np.random.default_rng(5)
    src = _dense(9, (40, 2, h, w))
    dense = torch.einsum("nshwk,sc->nchwk", src, torch.from_numpy(rng.standard_normal((2, c))).float())
    dense = dense + 1e-3 * _dense(10, (40, c, h, w))
    x = pack(dense.to(torch.float16).float(), w).numpy()
    b = fit_basis(x, h, w).astype(np.float64)
    np.testing.assert_allclose(b.T @ b, np.eye(c), atol=1e-6)
    energy = (np.einsum("nch,cd->ndh", x, b) ** 2).sum(axis=(0, 2))  # per component
    assert energy[:2].sum() > 0.999 * energy.sum()
    spec = CacheSpec(rows=40, rows_per_shard=40, num_classes=2, layers=[LayerSpec(0, "b0", c, h, w)],
                     quantize="step", error=0.05)
    spec = calibrated_spec(spec, {"b0": x}, delta=False, basis=True)
    layer = spec.layers[0]
    np.testing.assert_allclose(basis_matrix(layer.basis), b, atol=0)
    parts = encoded_layers(spec, {"b0": dense})[0]
    got = pack(torch.from_numpy(decode({k: v.numpy() for k, v in parts.items()}, h, w, True, "step", layer.steps,
                                       None, layer.basis)).double(), w).numpy()
    coef_err = np.einsum("nch,cd->ndh", got - x, b)
    assert np.all(np.abs(coef_err) <= np.asarray(layer.steps) / 2 + 1e-3 * np.abs(np.einsum("nch,cd->ndh", x, b)))
    wts = packed_weights(h, w)
    assert np.sqrt(((got - x) ** 2 * wts).sum() / (x.astype(np.float64) ** 2 * wts).sum()) <= 0.05 * 1.01


def test_step_config_needs_packing_and_delta_needs_step():
    with pytest.raises(ConfigError, match="packed: true"):
        config_from_dict(tiny_tree(**{"extract.compress.quantize": "step", "extract.compress.packed": False}))
    with pytest.raises(ConfigError, match="needs quantize: step"):
        config_from_dict(tiny_tree(**{"extract.compress.delta": True}))
    with pytest.raises(ConfigError, match="needs quantize: step"):
        config_from_dict(tiny_tree(**{"extract.compress.basis": True}))


@pytest.fixture(scope="module")
def step_cache(built, tmp_path_factory):
    """The tiny pipeline's extract with step + delta encoding and every block cached (0, 1, 2, 3: a
    chain of four), beside the session's exact cache."""
    _, _, recs = built
    wd = copy_upstream(recs, tmp_path_factory.mktemp("step"), ("prepare", "teacher"))
    cfg = config_from_dict(tiny_tree(**{**STEP, "extract.layers": [0, 1, 2, 3]}), workdir=str(wd))
    return open_cache(recs["extract"]), open_cache(Runner(cfg).run("extract")["extract"])


def test_only_consecutive_blocks_are_chained():
    from cache.encoding import chained_layers

    layers = [LayerSpec(0, "b0", 4, 2, 2), LayerSpec(1, "b1", 4, 2, 2), LayerSpec(3, "b3", 4, 2, 2),
              LayerSpec(4, "b4", 4, 2, 2, pooled=2)]
    assert [la.base for la in chained_layers(layers, True)] == [None, "b0", None, None]
    assert [la.base for la in chained_layers(layers, False)] == [None] * 4


def test_extract_step_cache_is_within_its_tables_of_the_exact_one(step_cache):
    """Each decoded value within half its step (and float16's rounding) of the exact cache's, and
    each layer's relative error within the declared 5%, on rows past the calibration rows too."""
    exact, cache = step_cache
    spec = cache.spec
    assert spec.quantize == "step" and spec.error == 0.05 and spec.compressor == "blosc"
    for layer in spec.layers:
        if layer.index not in exact.layers:
            continue
        assert len(layer.steps) == layer.height * layer.width
        a, b = 0, 600
        ref = pack(torch.from_numpy(exact.read_layer("spectra", layer.index, a, b)).float(), layer.width).numpy()
        got = pack(torch.from_numpy(cache.read_layer("spectra", layer.index, a, b)).float(), layer.width).numpy()
        bound = np.asarray(layer.steps) / 2 + np.abs(ref) * 2.0 ** -10  # half a step, and float16's rounding
        assert np.all(np.abs(got - ref) <= bound)
        wts = packed_weights(layer.height, layer.width)
        rel = np.sqrt(((got - ref) ** 2 * wts).sum() / (ref ** 2 * wts).sum())
        assert 0.02 < rel <= 0.05 * 1.05


def test_delta_chain_cache_reads_and_decodes_on_the_device(step_cache):
    _, cache = step_cache
    spec = cache.spec
    assert [la.base for la in spec.layers] == [None, "blocks.0", "blocks.1", "blocks.2"]
    a, b = 10, 90
    enc = cache.read_encoded_layers([3, 1], a, b)
    assert sorted(enc) == [0, 1, 2, 3]  # the chain of layer 3
    got = decode_layers_torch(spec, {i: {k: torch.from_numpy(v) for k, v in p.items()} for i, p in enc.items()}, [3, 1])
    for i in (3, 1):
        want = cache.read_layer("spectra", i, a, b)
        np.testing.assert_array_equal(got[i].numpy().view(np.uint16), want.view(np.uint16))


def test_the_calibrated_spec_survives_its_attributes():
    from cache.layout import spec_from_attrs, spec_to_attrs

    layers = [LayerSpec(0, "blocks.0", 4, 2, 2, steps=(0.1, 0.2, 0.3, 0.4)),
              LayerSpec(1, "blocks.1", 4, 2, 2, steps=(0.5, 0.25, 0.125, 1 / 3), base="blocks.0")]
    spec = CacheSpec(rows=10, rows_per_shard=5, num_classes=3, layers=layers, quantize="step", error=0.01)
    import json

    assert spec_from_attrs(json.loads(json.dumps(spec_to_attrs(spec)))) == spec
