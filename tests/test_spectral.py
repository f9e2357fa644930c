"""The SpectralKD math against independent float64 numpy computations, plus its properties (the losses
built on it: tests/test_losses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.forms import features_of, spectra_of
from stages.spectral import (
    channel_spectrum,
    channel_spectrum_sum,
    pool_channels,
    radial_energy_sum,
    spectral_term,
    spectrum,
)


def np_pool(x: np.ndarray, c_out: int) -> np.ndarray:
    """Adaptive average pooling of axis 1: group i = channels floor(i*C/c) .. ceil((i+1)*C/c)-1."""
    c = x.shape[1]
    out = []
    for i in range(c_out):
        a, b = (i * c) // c_out, -(-((i + 1) * c) // c_out)
        out.append(x[:, a:b].mean(axis=1))
    return np.stack(out, axis=1)


def np_spectrum(x: np.ndarray) -> np.ndarray:
    s = np.fft.rfft2(x.astype(np.float64), axes=(-2, -1), norm="ortho")
    return np.stack([s.real, s.imag], axis=-1)


arrays = st.tuples(st.integers(1, 3), st.integers(2, 12), st.integers(2, 6), st.integers(2, 7), st.integers(0, 10**6))


@settings(max_examples=25, deadline=None)
@given(arrays, st.integers(1, 12))
def test_pooling_commutes_with_fft(shape, c_out):
    b, c, h, w, seed = shape
    c_out = min(c_out, c)
    x = torch.tensor(np.random.default_rng(seed).normal(size=(b, c, h, w)), dtype=torch.float64)
    lhs = spectrum(pool_channels(x, c_out))
    rhs = pool_channels(spectrum(x.double()), c_out)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), atol=1e-5)
    np.testing.assert_allclose(pool_channels(x, c_out).numpy(), np_pool(x.numpy(), c_out), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(arrays)
def test_spectrum_parseval_linearity_inverse(shape):
    b, c, h, w, seed = shape
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(b, c, h, w)), rng.normal(size=(b, c, h, w))
    sx = spectrum(torch.tensor(x)).numpy().astype(np.float64)
    np.testing.assert_allclose(sx, np_spectrum(x), atol=1e-4)
    # linearity
    sxy = spectrum(torch.tensor(2 * x - 3 * y)).numpy()
    np.testing.assert_allclose(sxy, 2 * sx - 3 * spectrum(torch.tensor(y)).numpy(), atol=1e-3)
    # Parseval for the ortho rfft2: bins other than the DC/Nyquist columns appear twice in the full FFT
    full = np.fft.fft2(x, norm="ortho")
    assert np.sum(np.abs(full) ** 2) == pytest.approx(np.sum(x**2), rel=1e-9)
    # the reader's forms (cache.forms): its spectra equal numpy's, its inverse recovers the features
    # for odd and even widths
    np.testing.assert_allclose(spectra_of(x), np_spectrum(x), atol=1e-4)
    np.testing.assert_allclose(features_of(spectrum(torch.tensor(x)).numpy(), w), x, atol=1e-4)


def test_channel_spectrum_and_partial_sums_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 10, 3, 4))
    want = np.array([np.mean(np.abs(np.fft.fft(x[:, :, i, j], axis=1)) / 10, axis=0)
                     for i in range(3) for j in range(4)]).mean(0)
    np.testing.assert_allclose(channel_spectrum(x), want, rtol=1e-12)
    parts = channel_spectrum_sum(x[:2]) + channel_spectrum_sum(x[2:])
    np.testing.assert_allclose(parts / (6 * 12), want, rtol=1e-5)
    e = radial_energy_sum(x, 3)
    assert e.shape == (3,)
    # total radial energy equals the rfft2 energy (ortho): sum over the half-plane bins
    s = np.fft.rfft2(x, norm="ortho")
    assert e.sum() == pytest.approx((np.abs(s) ** 2).sum(), rel=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 3, 7, 5), (2, 3, 8, 8), (2, 3, 9, 9), (2, 3, 14, 14)])
def test_matrix_and_fft_paths_agree_with_numpy_and_carry_gradients(shape):
    x = np.random.default_rng(1).normal(size=shape)
    # the first call builds the transform matrix inside inference mode, as extract does
    with torch.inference_mode():
        fast = spectrum(torch.tensor(x, dtype=torch.float32))
    slow = torch.view_as_real(torch.fft.rfft2(torch.tensor(x, dtype=torch.float32), norm="ortho"))
    np.testing.assert_allclose(fast.numpy(), np_spectrum(x), atol=1e-5)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5)
    # the gradient of sum(S * G) is the adjoint transform of G: compare with torch.fft's autograd
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    xf = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    g = torch.tensor(np.random.default_rng(2).normal(size=fast.shape), dtype=torch.float32)
    (spectrum(xt) * g).sum().backward()
    (torch.view_as_real(torch.fft.rfft2(xf, norm="ortho")) * g).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), xf.grad.numpy(), atol=1e-5)


layer_shapes = st.tuples(st.integers(1, 9), st.integers(0, 9), st.integers(1, 8), st.integers(1, 8)).filter(
    lambda t: t[2] * t[3] <= 64)  # (student channels, extra teacher channels, h, w): the CPU matrix path


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), layers=st.lists(layer_shapes, min_size=1, max_size=3), weight=st.floats(0.1, 3.0),
       seed=st.integers(0, 99))
def test_spectral_term_value_and_gradient_equal_float64_references(b, layers, weight, seed):
    """The one-pass term on small CPU maps: its value against numpy's rfft2 in float64, its gradient
    (scaled by the caller's weight) against torch.fft's autograd in float64."""
    rng = np.random.default_rng(seed)
    fs = [rng.normal(size=(b, c, h, w)) for c, _, h, w in layers]
    ts = [np_spectrum(rng.normal(size=(b, c + extra, h, w))) for c, extra, h, w in layers]
    x = [torch.tensor(f, dtype=torch.float32, requires_grad=True) for f in fs]
    got = spectral_term(x, [torch.tensor(t, dtype=torch.float16) for t in ts])
    (weight * got).backward()
    t16 = [torch.tensor(t, dtype=torch.float16).double().numpy() for t in ts]  # what the cache holds
    want = np.mean([((np_spectrum(f) - np_pool(t, f.shape[1])) ** 2).mean() for f, t in zip(fs, t16)])
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    x64 = [torch.tensor(f, requires_grad=True) for f in fs]
    ref = torch.stack([((torch.view_as_real(torch.fft.rfft2(xx, norm="ortho"))
                         - torch.tensor(np_pool(t, xx.shape[1]))) ** 2).mean() for xx, t in zip(x64, t16)]).mean()
    (weight * ref).backward()
    for a, r in zip(x, x64):
        np.testing.assert_allclose(a.grad.numpy(), r.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_spectral_term_takes_the_fft_path_for_large_maps_with_the_same_value():
    rng = np.random.default_rng(3)
    small = [torch.tensor(rng.normal(size=(2, 4, 8, 8)), dtype=torch.float32)]
    large = [torch.tensor(rng.normal(size=(2, 4, 9, 9)), dtype=torch.float32)]
    for fs in (small, large):
        t = [spectrum(torch.tensor(rng.normal(size=f.shape), dtype=torch.float32)) for f in fs]
        want = np.mean([((np_spectrum(f.numpy()) - tt.numpy()) ** 2).mean() for f, tt in zip(fs, t)])
        assert spectral_term(fs, t).item() == pytest.approx(want, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), c=st.integers(1, 130), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 99),
       split=st.integers(0, 4), ties=st.booleans())
def test_snapshot_sums_equal_float64_numpy(b, c, h, w, seed, split, ties):
    """layer_sums (what a distill snapshot records) against an independent float64 computation:
    the channel spectrum, the energy grid, and the channel entropy by np.histogram per position."""
    from stages.spectral import layer_sums

    x = np.random.default_rng(seed).normal(size=(b, c, h, w))
    if ties:  # constant and repeated channel values: one bin, entropy 0 for a constant vector
        x = np.round(x) if c > 1 else x
        x[0, :, 0, 0] = 1.5
    x = x.astype(np.float32)
    cut = min(split, b)
    parts = [layer_sums(x[:cut]), layer_sums(x[cut:])] if 0 < cut < b else [layer_sums(x)]
    got = {k: sum(p[k] for p in parts) for k in parts[0]}
    xd = x.astype(np.float64)
    assert got["positions"] == b * h * w
    want_spec = (np.abs(np.fft.fft(xd, axis=1)) / c).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(got["spectrum_sum"], want_spec, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["grid_energy"], (np.abs(np.fft.rfft2(xd, norm="ortho")) ** 2).sum(axis=(0, 1)),
                               rtol=1e-5, atol=1e-6)
    ent = 0.0
    for i in range(b):
        for y in range(h):
            for z in range(w):
                v = xd[i, :, y, z]
                counts, _ = np.histogram(v, bins=100, range=(v.min(), v.max()) if v.max() > v.min() else None)
                p = counts[counts > 0] / c
                ent += float(-(p * np.log(p)).sum())
    assert got["entropy_sum"] == pytest.approx(ent, rel=1e-9, abs=1e-9)
