"""The SpectralKD math against independent float64 numpy computations, plus its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.spectral import (
    channel_spectrum,
    channel_spectrum_sum,
    inverse_spectrum,
    pool_channels,
    radial_energy_sum,
    spectral_term,
    spectralkd_loss,
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


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(zs, y, ls):
    k = zs.shape[1]
    target = np.eye(k)[y] * (1 - ls) + ls / k
    return -(target * np_log_softmax(zs)).sum(1).mean()


def np_spec(fs, ts_feats):
    layer = []
    for f, t in zip(fs, ts_feats):
        ss = np_spectrum(f)
        tt = np_pool(np_spectrum(t), f.shape[1])
        layer.append(((ss - tt) ** 2).mean())
    return np.mean(layer)


def np_loss(zs, y, zt, fs, ts_feats, alpha, tau, beta, w_fft, ls, kind="spectral"):
    """The official DistillationLoss types, in float64 numpy; teacher spectra computed from teacher
    features.  'spectral' = official 'soft', 'spectral_only' = official 'fft'."""
    ce = np_ce(zs, y, ls)
    ls_s, ls_t = np_log_softmax(zs / tau), np_log_softmax(zt / tau)
    kl = (np.exp(ls_t) * (ls_t - ls_s)).sum(1).mean() * tau * tau
    spec = np_spec(fs, ts_feats) if fs else 0.0
    if kind == "spectral":
        return (1 - alpha) * ce + alpha * kl + beta * w_fft * spec
    if kind == "spectral_only":
        return (1 - alpha) * ce + beta * w_fft * spec
    if kind == "hard":
        return (1 - alpha) * ce + alpha * np_ce(zs, zt.argmax(1), 0.0) + beta * w_fft * spec
    raise ValueError(kind)


@pytest.mark.parametrize("w", [6, 7])
@pytest.mark.parametrize("c_s,c_t", [(8, 8), (6, 16), (5, 12)])
def test_spectral_loss_matches_numpy_float64(w, c_s, c_t):
    rng = np.random.default_rng(w * 100 + c_s)
    b, h, k = 3, 5, 7
    zs, zt = rng.normal(size=(b, k)), rng.normal(size=(b, k))
    y = rng.integers(0, k, b)
    fs = [rng.normal(size=(b, c_s, h, w)) for _ in range(2)]
    tf = [rng.normal(size=(b, c_t, h, w)) for _ in range(2)]
    want = np_loss(zs, y, zt, fs, tf, 0.9, 2.0, 1.0, 0.2, 0.1)
    terms = spectralkd_loss(
        torch.tensor(zs, dtype=torch.float32), torch.tensor(y), torch.tensor(zt, dtype=torch.float32),
        [torch.tensor(f, dtype=torch.float32) for f in fs],
        [spectrum(torch.tensor(t, dtype=torch.float32)) for t in tf],
        kind="spectral", alpha=0.9, tau=2.0, beta=1.0, w_fft=0.2, label_smoothing=0.1,
    )
    assert terms.total.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind,pairs", [("hard", 2), ("hard", 0), ("spectral_only", 1), ("spectral_only", 3)])
def test_hard_and_spectral_only_match_numpy_float64(kind, pairs):
    rng = np.random.default_rng(pairs * 7 + len(kind))
    b, c_s, c_t, h, w, k = 4, 6, 12, 5, 4, 9
    zs, zt = rng.normal(size=(b, k)) * 2, rng.normal(size=(b, k)) * 2
    y = rng.integers(0, k, b)
    fs = [rng.normal(size=(b, c_s, h, w)) for _ in range(pairs)]
    tf = [rng.normal(size=(b, c_t, h, w)) for _ in range(pairs)]
    want = np_loss(zs, y, zt, fs, tf, 0.7, 3.0, 0.5, 0.2, 0.1, kind=kind)
    terms = spectralkd_loss(
        torch.tensor(zs, dtype=torch.float32), torch.tensor(y), torch.tensor(zt, dtype=torch.float32),
        [torch.tensor(f, dtype=torch.float32) for f in fs] or None,
        [spectrum(torch.tensor(t, dtype=torch.float32)) for t in tf] or None,
        kind=kind, alpha=0.7, tau=3.0, beta=0.5, w_fft=0.2, label_smoothing=0.1,
    )
    assert terms.total.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert terms.ce.item() == pytest.approx(np_ce(zs, y, 0.1), rel=1e-5)
    if pairs:
        assert terms.spec.item() == pytest.approx(np_spec(fs, tf), rel=1e-5)
    else:
        assert terms.spec.item() == 0
    if kind == "hard":
        assert terms.kd.item() == pytest.approx(np_ce(zs, zt.argmax(1), 0.0), rel=1e-5)
    else:
        assert terms.kd.item() == 0


def test_spectral_only_needs_no_teacher_logits_and_hard_gets_no_gradient_through_argmax():
    zs = torch.randn(3, 4, requires_grad=True)
    zt = torch.randn(3, 4, requires_grad=True)
    f = torch.randn(3, 2, 4, 4, requires_grad=True)
    terms = spectralkd_loss(zs, torch.tensor([0, 1, 2]), None, [f], [spectrum(torch.randn(3, 4, 4, 4))],
                            kind="spectral_only")
    assert terms.spec.item() > 0
    with pytest.raises(ValueError, match="spectral_only"):
        spectralkd_loss(zs, torch.tensor([0, 1, 2]), None, kind="spectral_only")
    hard = spectralkd_loss(zs, torch.tensor([0, 1, 2]), zt, kind="hard")
    g = torch.autograd.grad(hard.total, [zs, zt], allow_unused=True)
    assert g[0].abs().sum() > 0 and (g[1] is None or g[1].abs().sum() == 0)
    with pytest.raises(ValueError, match="unknown loss kind 'soft'"):
        spectralkd_loss(zs, torch.tensor([0, 1, 2]), zt, kind="soft")


def test_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student_feat = torch.randn(2, 4, 4, 4, requires_grad=True)
    student_logits = torch.randn(2, 5, requires_grad=True)
    teacher_feat = torch.randn(2, 8, 4, 4, requires_grad=True)
    teacher_logits = torch.randn(2, 5, requires_grad=True)
    t_spec = spectrum(teacher_feat)
    terms = spectralkd_loss(student_logits, torch.tensor([0, 3]), teacher_logits, [student_feat], [t_spec])
    params = [student_feat, student_logits, teacher_feat, teacher_logits]
    grads = torch.autograd.grad(terms.total, params, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is not None and grads[1].abs().sum() > 0
    # the loss treats teacher quantities as constants: no gradient flows back into them
    assert grads[2] is None or grads[2].abs().sum() == 0
    assert grads[3] is None or grads[3].abs().sum() == 0


def test_kinds_select_terms():
    zs, zt = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    none = spectralkd_loss(zs, y, kind="none", label_smoothing=0.0)
    assert none.total.item() == pytest.approx(torch.nn.functional.cross_entropy(zs, y).item(), rel=1e-6)
    logits = spectralkd_loss(zs, y, zt, kind="logits", alpha=1.0, label_smoothing=0.0)
    assert logits.spec.item() == 0 and logits.total.item() == pytest.approx(logits.kd.item())
    assert logits.kd.item() > 0
    with pytest.raises(ValueError):
        spectralkd_loss(zs, y, zt, kind="spectral")


def test_spatial_mismatch_names_the_pair():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="layer pair #0"):
        spectralkd_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3),
                        [torch.randn(2, 4, 4, 4)], [spectrum(torch.randn(2, 4, 5, 5))])


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
    # inverse recovers the features for odd and even widths
    back = inverse_spectrum(spectrum(torch.tensor(x)), w).numpy()
    np.testing.assert_allclose(back, x, atol=1e-4)


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
    got = spectral_term("spectral", x, [torch.tensor(t, dtype=torch.float16) for t in ts])
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
        assert spectral_term("spectral", fs, t).item() == pytest.approx(want, rel=1e-5)


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
