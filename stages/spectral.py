"""The SpectralKD math, pure and small.

Notation (ARCHITECTURE.md and the README's loss section): features ``X`` are (B, C, H, W) NCHW maps from timm's
``forward_intermediates``.

* :func:`spectrum`: ``S = rfft2(X, norm="ortho")`` over (H, W) in float32, returned as a real tensor
  (B, C, H, W//2+1, 2) with (real, imag) on the last axis: the cache's storage form.
* :func:`pool_channels`: adaptive average pooling along C (adjacent channel groups, as
  ``adaptive_avg_pool1d`` groups them).  Linear and on another axis than the FFT, so it commutes
  with it: the cached teacher spectrum is pooled to the student's width at read time.
* :func:`spectral_layer_loss`: MSE over the stacked (real, imag) of the student's spectrum and the
  pooled teacher spectrum; :func:`spectral_term` its mean over layer pairs, L_spec.
* :func:`kd_kl`: ``T^2 * KL(p_t || p_s)``.  The losses that combine these terms are the registry's
  (``losses/``).
* :func:`channel_spectrum` / :func:`intensity`: the interpretability measure
  ``S_l(f) = mean_{b,h,w} |FFT_C(X)[f]| / C`` and ``L(X) = mean_f S_l(f)``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError


# On CPU, maps of at most this many pixels are transformed by one real matrix product: for the
# small maps of ViT layers (4x4 .. 8x8) that is 2-12x faster than torch.fft's per-transform cost.
DFT_MATMUL_MAX_PIXELS = 64


@functools.lru_cache(maxsize=16)
def _rdft2_matrix(h: int, w: int) -> torch.Tensor:
    """The real (h*w, h*(w//2+1)*2) matrix of rfft2(norm="ortho"), built in float64, kept float32."""
    wr = w // 2 + 1
    y, x = np.arange(h)[:, None, None, None], np.arange(w)[None, :, None, None]
    u, v = np.arange(h)[None, None, :, None], np.arange(wr)[None, None, None, :]
    angle = -2.0 * np.pi * (u * y / h + v * x / w)
    m = np.stack([np.cos(angle), np.sin(angle)], axis=-1) / np.sqrt(h * w)
    with torch.inference_mode(False):  # a normal tensor, usable under autograd later
        return torch.from_numpy(m.reshape(h * w, h * wr * 2)).float()


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """rfft2 over the last two axes (norm="ortho"), float32, as (..., H, W//2+1, 2) real/imag.

    Small maps on CPU go through :func:`_rdft2_matrix` (the same transform as one float32
    matrix product), everything else through ``torch.fft.rfft2``.
    """
    x = x.float()
    h, w = x.shape[-2], x.shape[-1]
    if x.device.type == "cpu" and h * w <= DFT_MATMUL_MAX_PIXELS:
        lead = x.shape[:-2]
        with torch.autocast("cpu", enabled=False):
            out = x.reshape(*lead, h * w) @ _rdft2_matrix(h, w)
        return out.view(*lead, h, w // 2 + 1, 2)
    return torch.view_as_real(torch.fft.rfft2(x, norm="ortho"))


def pool_channels(t: torch.Tensor, channels: int, axis: int = 1) -> torch.Tensor:
    """Adaptive average pooling of axis ``axis`` down to ``channels`` (identity if equal).

    Group i averages input channels ``floor(i*C/c) .. ceil((i+1)*C/c) - 1``.
    """
    c_in = t.shape[axis]
    if c_in == channels:
        return t
    if channels > c_in:
        raise PipelineError(f"cannot pool {c_in} teacher channels up to {channels} student channels")
    if c_in % channels == 0:  # equal groups: a reshape and a mean, no data movement
        axis = axis % t.ndim
        return t.unflatten(axis, (channels, c_in // channels)).mean(axis + 1)
    moved = t.movedim(axis, -1)
    shape = moved.shape
    pooled = F.adaptive_avg_pool1d(moved.reshape(-1, 1, c_in), channels)
    return pooled.reshape(*shape[:-1], channels).movedim(-1, axis)


def spectral_layer_loss(student_spectrum: torch.Tensor, teacher_spectrum: torch.Tensor) -> torch.Tensor:
    """MSE between a student spectrum and the teacher's, pooled to the student's width first."""
    t = pool_channels(teacher_spectrum.float(), student_spectrum.shape[1], axis=1)
    return F.mse_loss(student_spectrum.float(), t)


def check_pair(student_feat_shape, teacher_spectrum_shape, pair_name: str) -> None:
    """Clear error for spatial mismatches between a student feature map and a teacher spectrum."""
    h, w = student_feat_shape[-2:]
    th, tw = teacher_spectrum_shape[-3], teacher_spectrum_shape[-2]
    if (h, w // 2 + 1) != (th, tw):
        raise PipelineError(
            f"layer pair {pair_name}: student grid {h}x{w} (spectrum {h}x{w // 2 + 1}) does not match "
            f"the teacher spectrum {th}x{tw}"
        )
    if student_feat_shape[1] > teacher_spectrum_shape[1]:
        raise PipelineError(
            f"layer pair {pair_name}: student has {student_feat_shape[1]} channels, more than the "
            f"teacher's {teacher_spectrum_shape[1]}: channel pooling only narrows"
        )


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch mean."""
    log_ps = F.log_softmax(student_logits.float() / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return (tau * tau) * F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")


def spectral_term(student_feats, teacher_spectra, who: str = "the spectral term") -> torch.Tensor:
    """L_spec: the mean over layer pairs of :func:`spectral_layer_loss`.  Small maps on CPU take
    :class:`_MatrixSpectralMSE` (the same value, its gradient formed in one pass).  ``who`` names the
    loss in the error for missing spectra."""
    if not student_feats or teacher_spectra is None or len(student_feats) != len(teacher_spectra):
        raise ValueError(f"loss kind {who!r} needs one teacher spectrum per student feature map")
    for i, (f, ts) in enumerate(zip(student_feats, teacher_spectra)):
        check_pair(f.shape, ts.shape, f"#{i}")
    if all(_matrix_path(f) for f in student_feats):
        targets = tuple(pool_channels(ts.detach().float(), f.shape[1], axis=1)
                        for f, ts in zip(student_feats, teacher_spectra))
        return _MatrixSpectralMSE.apply(targets, *student_feats)
    losses = [spectral_layer_loss(spectrum(f), ts.detach()) for f, ts in zip(student_feats, teacher_spectra)]
    return torch.stack(losses).mean()


def _matrix_path(x: torch.Tensor) -> bool:
    """Whether :func:`spectrum` transforms ``x`` by one matrix product (small maps on CPU)."""
    return x.device.type == "cpu" and x.shape[-2] * x.shape[-1] <= DFT_MATMUL_MAX_PIXELS


class _MatrixSpectralMSE(torch.autograd.Function):
    """mean over pairs of mean((X R - T)^2), with X a layer's features flattened to (B*C, H*W),
    R its :func:`_rdft2_matrix` and T the teacher spectrum at the student's width.  The forward
    pass also forms each gradient, 2 (X R - T) R^T / (n * pairs): per layer two matrix products
    and no autograd node per elementwise op, which on the small maps of a distilled ViT is most
    of the term's cost."""

    @staticmethod
    def forward(ctx, targets: tuple[torch.Tensor, ...], *feats: torch.Tensor) -> torch.Tensor:
        total = feats[0].new_zeros((), dtype=torch.float32)
        grads = []
        with torch.autocast("cpu", enabled=False):
            for x, t in zip(feats, targets):
                h, w = x.shape[-2], x.shape[-1]
                r = _rdft2_matrix(h, w)
                flat_x = x.float().reshape(-1, h * w)
                resid = torch.addmm(t.reshape(flat_x.shape[0], -1), flat_x, r, beta=-1)  # X R - T
                scale = 1.0 / (resid.numel() * len(feats))
                total = total + torch.dot(resid.view(-1), resid.view(-1)) * scale
                if ctx.needs_input_grad[1 + len(grads)]:
                    grads.append((resid @ r.T).mul_(2.0 * scale).view(x.shape).to(x.dtype))
                else:
                    grads.append(None)
        ctx.grads = grads
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        return (None, *[None if g is None else g * grad_total for g in ctx.grads])


# ----------------------------------------------------------------------------- analysis


def channel_spectrum(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """S(f) = mean over b, h, w of |FFT_C(X)[f]| / C for X (B, C, H, W); float64 numpy (C,)."""
    a = np.asarray(x, dtype=np.float64)
    c = a.shape[1]
    mag = np.abs(np.fft.fft(a, axis=1)) / c
    return mag.mean(axis=(0, 2, 3))


def _row_slices(n_rows: int, row_elems: int, max_elems: int = 1 << 18):
    step = max(1, max_elems // max(1, row_elems))
    return [slice(i, min(n_rows, i + step)) for i in range(0, n_rows, step)]


def channel_spectrum_sum(block: np.ndarray) -> np.ndarray:
    """Per-block partial sums for :func:`channel_spectrum`: (C,) sum over b, h, w of |FFT_C|/C.

    Works through the block a few rows at a time so its temporaries stay small.
    """
    c = block.shape[1]
    out = np.zeros(c, dtype=np.float64)
    for sl in _row_slices(block.shape[0], int(np.prod(block.shape[1:]))):
        a = np.asarray(block[sl], dtype=np.float32)
        out += (np.abs(np.fft.fft(a, axis=1)) / c).sum(axis=(0, 2, 3), dtype=np.float64)
    return out


def intensity(x) -> float:
    """L(X) = mean over f of S(f)."""
    return float(channel_spectrum(x).mean())


def radial_band_index(h: int, w: int, bands: int) -> np.ndarray:
    """Band (0 = lowest) of each rfft2 bin (h, w//2+1): radial frequency split into equal bands."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2) / np.sqrt(0.5**2 + 0.5**2)
    return np.minimum((r * bands).astype(int), bands - 1)


def radial_energy_sum(block: np.ndarray, bands: int) -> np.ndarray:
    """Per-block sums of |rfft2(X)|^2 per radial band (summed over b, c)."""
    return band_energy(grid_energy_sum(block), block.shape[-2], block.shape[-1], bands)


def grid_energy_sum(block: np.ndarray) -> np.ndarray:
    """Per-block sums of |rfft2(X, norm="ortho")|^2 over b and c: (H, W//2+1), the spatial-frequency
    energy grid that :func:`radial_energy_sum` bins into bands (``band_energy`` does it later)."""
    e = np.zeros((block.shape[-2], block.shape[-1] // 2 + 1), dtype=np.float64)
    for sl in _row_slices(block.shape[0], int(np.prod(block.shape[1:]))):
        s = np.fft.rfft2(np.asarray(block[sl], dtype=np.float32), norm="ortho")
        e += (np.abs(s) ** 2).sum(axis=(0, 1))
    return e


def band_energy(grid: np.ndarray, h: int, w: int, bands: int) -> np.ndarray:
    """The energy grid of :func:`grid_energy_sum` summed per radial band (:func:`radial_band_index`)."""
    idx = radial_band_index(h, w, bands)
    return np.bincount(idx.ravel(), weights=np.asarray(grid, dtype=np.float64).ravel(), minlength=bands)


ENTROPY_BINS = 100


def _histogram_bins(v: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each value of each row of ``v`` (rows, n) among ``bins`` equal-width bins spanning
    the row's min..max, the last bin closed: the rule of ``np.histogram(row, bins)``, values on an
    edge included (its linspace edges, then one step of correction against them)."""
    lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    flat = hi <= lo
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)  # numpy's range for a constant row
    step = (hi - lo) / bins
    k = ((v - lo) * (bins / (hi - lo))).astype(np.int64)
    k[k == bins] = bins - 1
    k -= v < k * step + lo
    upper = np.where(k + 1 == bins, hi, (k + 1) * step + lo)
    k += (v >= upper) & (k != bins - 1)
    return k


def channel_entropy_sum(block: np.ndarray, bins: int = ENTROPY_BINS) -> float:
    """Per-block sum, over images b and positions (h, w), of the channel entropy of X (B, C, H, W).

    Channel entropy of one position: the C values of its channel vector in a histogram of ``bins``
    equal-width bins spanning that vector's own min..max (the last bin closed), p_k = n_k / C,
    H = -sum_k p_k ln p_k (nats); a constant vector has entropy 0.  Divide by B*H*W for the mean.
    """
    total = 0.0
    c = block.shape[1]
    n = np.arange(c + 1, dtype=np.float64)
    n_log_n = n * np.log(np.maximum(n, 1.0))  # H = ln C - sum_k n_k ln n_k / C, with 0 ln 0 = 0
    for sl in _row_slices(block.shape[0], int(np.prod(block.shape[1:])), max_elems=1 << 16):
        v = np.moveaxis(np.asarray(block[sl], dtype=np.float64), 1, -1).reshape(-1, c)  # (positions, C)
        k = _histogram_bins(v, bins)
        counts = np.bincount((k + bins * np.arange(len(v))[:, None]).ravel(), minlength=len(v) * bins)
        total += len(v) * np.log(c) - float(n_log_n[counts].sum()) / c
    return total


def _norm_profile(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.mean(v)), 1e-30)


def profile_distance(t_depth: np.ndarray, t_val: np.ndarray, s_depth: np.ndarray, s_val: np.ndarray) -> float:
    """Mean |difference| of mean-normalized intensity profiles, teacher interpolated at student depths."""
    t_at = np.interp(s_depth, t_depth, _norm_profile(t_val))
    return float(np.mean(np.abs(_norm_profile(s_val) - t_at)))


def layer_sums(block: np.ndarray) -> dict:
    """Every analysis sum of one block of a layer's features (B, C, H, W): the channel-spectrum sums,
    the spatial-frequency energy grid, the channel-entropy sum and the number of (b, h, w) positions.
    Sums of blocks add up; divide by ``positions`` for means."""
    return {"spectrum_sum": channel_spectrum_sum(block), "grid_energy": grid_energy_sum(block),
            "entropy_sum": channel_entropy_sum(block), "positions": block.shape[0] * block.shape[2] * block.shape[3]}
