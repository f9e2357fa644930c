"""How a layer's spectrum is encoded on disk, and decoded back to the dense form every reader gets.

The dense form is the one :func:`stages.spectral.spectrum` returns: (C, H, W//2+1, 2) float16 per
row, real and imaginary parts on the last axis.  On disk (``extract.compress``):

* **packed** (lossless): the rfft2 half-spectrum of a real H x W map has exactly H*W free real
  numbers.  In the columns that are their own mirror (k = 0, and k = W/2 for even W) a row h and
  its mirror (-h mod H) are complex conjugates, and the self-mirrored bins (h = 0, and h = H/2 for
  even H) are real.  Packing keeps the real part of every kept bin and the imaginary part where it
  is not zero by symmetry, in the dense layout's order; unpacking mirrors the rest back.  A
  row's C x H*W numbers replace C x H x (W//2+1) x 2: 1.5x fewer at 4x4, 1.14x at 14x14.
* **int8**: each (row, channel) as int8 with a float16 scale ``s = absmax / 127`` (array
  ``spectra_scale/<layer>``); every value is off by at most ``s / 2`` before the float16 rounding
  of the decoded value.
* channel pooling happens before encoding (extract pools the features to the declared width); the
  codec only sees the pooled channel count.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

INT8_MAX = 127


@functools.lru_cache(maxsize=32)
def hermitian_maps(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index maps between the dense half-spectrum (flattened H x (W//2+1) x 2) and its H*W free numbers.

    Returns ``keep`` (H*W dense positions, ascending), ``source`` (for each dense position, the
    packed position it is read from; H*W means "zero") and ``sign`` (+1, or -1 for the imaginary
    part of a mirrored bin).
    """
    wr = w // 2 + 1
    dense = np.arange(h * wr * 2).reshape(h, wr, 2)
    own_mirror_cols = {0} | ({w // 2} if w % 2 == 0 else set())
    keep: list[int] = []
    mirror: dict[int, tuple[int, float]] = {}  # dense position -> (dense position it mirrors, sign)
    for r in range(h):
        for k in range(wr):
            re, im = int(dense[r, k, 0]), int(dense[r, k, 1])
            if k not in own_mirror_cols:
                keep += [re, im]
                continue
            m = (-r) % h
            if m == r:  # a real bin: its imaginary part is zero, not stored
                keep.append(re)
            elif r < m:
                keep += [re, im]
            else:
                mirror[re] = (int(dense[m, k, 0]), 1.0)
                mirror[im] = (int(dense[m, k, 1]), -1.0)
    keep_arr = np.array(sorted(keep), dtype=np.int64)
    assert len(keep_arr) == h * w
    packed_of = {int(d): i for i, d in enumerate(keep_arr)}
    source = np.full(h * wr * 2, h * w, dtype=np.int64)
    sign = np.ones(h * wr * 2, dtype=np.float32)
    for d, i in packed_of.items():
        source[d] = i
    for d, (m, sg) in mirror.items():
        source[d], sign[d] = packed_of[m], sg
    return keep_arr, source, sign


def pack(dense: torch.Tensor, width: int) -> torch.Tensor:
    """(..., H, W//2+1, 2) -> (..., H*W): the free numbers of each half-spectrum of an H x ``width`` map."""
    h = dense.shape[-3]
    keep, _, _ = hermitian_maps(h, width)
    flat = dense.reshape(*dense.shape[:-3], -1)
    return flat.index_select(-1, torch.from_numpy(keep).to(flat.device))


def unpack(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H*W) -> (..., H, W//2+1, 2): the dense half-spectrum, mirrored bins filled in (same
    dtype; on CPU a gather and a sign flip cost a third of torch's index_select)."""
    source = hermitian_maps(height, width)[1]
    ext = np.concatenate([packed, np.zeros((*packed.shape[:-1], 1), packed.dtype)], axis=-1)
    dense = np.take(ext, source, axis=-1)
    neg = _negated(height, width)
    dense[..., neg] = -dense[..., neg]
    return dense.reshape(*packed.shape[:-1], height, width // 2 + 1, 2)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float16 scales of ``x`` (..., N), one scale per leading index: ``absmax / 127``.
    The scale is rounded to float16 first and the values divided by the rounded scale, so the only
    error is the int8 rounding, at most half a scale."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / INT8_MAX).to(torch.float16)
    s = scale.float().unsqueeze(-1)
    q = torch.round(x / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values back from :func:`quantize_int8`."""
    return q.float() * scale.float().unsqueeze(-1)


def encoded_shapes(channels: int, height: int, width: int, packed: bool, quantize: str) -> dict[str, tuple]:
    """Part name ('values', 'scale') -> (per-row shape, dtype) of one layer's encoded spectrum."""
    values = (channels, height * width) if packed else (channels, height, width // 2 + 1, 2)
    if quantize == "int8":
        return {"values": (values, "int8"), "scale": ((channels,), "float16")}
    return {"values": (values, "float16")}


def encode(dense: torch.Tensor, width: int, packed: bool, quantize: str) -> dict[str, torch.Tensor]:
    """A batch of float32 spectra (B, C, H, W//2+1, 2) as the parts :func:`encoded_shapes` names."""
    values = pack(dense, width) if packed else dense
    if quantize == "int8":
        q, scale = quantize_int8(values.reshape(*values.shape[:2], -1))
        return {"values": q.reshape(values.shape), "scale": scale}
    return {"values": values.to(torch.float16)}


def decode(parts: dict[str, np.ndarray], height: int, width: int, packed: bool, quantize: str) -> np.ndarray:
    """The dense float16 spectra (B, C, H, W//2+1, 2) of a batch of encoded rows as read from disk."""
    values = parts["values"]
    if quantize == "int8":
        values = (values.reshape(*values.shape[:2], -1).astype(np.float32)
                  * parts["scale"].astype(np.float32)[..., None]).reshape(values.shape)
    values = values.astype(np.float16, copy=False)
    return unpack(values, height, width) if packed else values


@functools.lru_cache(maxsize=32)
def _negated(height: int, width: int) -> np.ndarray:
    """Dense positions holding the negated imaginary part of a mirrored bin."""
    return np.flatnonzero(hermitian_maps(height, width)[2] < 0)
