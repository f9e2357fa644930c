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
* **step** (a quantization table per layer and frequency): each packed number j is stored as the
  integer ``q = round(x / step[j])`` and decoded as ``q * step[j]``, so it is off by at most
  ``step[j] / 2`` (before the float16 rounding of the decoded value).  The table is calibrated at
  extract (:func:`calibrate_steps`): one step per layer, found by bisection on calibration rows so
  that the layer's relative RMS error in the loss's own metric is ``extract.compress.error``, divided
  by the square root of each number's weight in the dense half-spectrum (a number the dense form
  holds twice, as a bin and its mirror, gets a step sqrt(2) smaller).  Under a squared error a step
  that is uniform in that metric spends fewest bits for a given error: frequencies (and channels)
  whose energy is below the step round to zero and cost almost nothing once entropy coded.  The
  integers are stored zigzag-mapped to uint16 (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) so that small
  magnitudes leave the high bits zero, and the chunk compressor (blosc: bit-shuffle, then zstd) is
  the entropy coder of what remains.  The input is the float16 spectrum (what an exact cache holds),
  so re-encoding an exact cache gives the bytes a direct extract gives.
* **delta** (with step): a layer whose ``base`` is the previous cached block is stored as its
  difference from that layer's *decoded* values (closed loop, so errors never accumulate along the
  chain: each layer stays within its own steps).  Consecutive blocks of a residual stream differ by
  one update, so the difference is smaller than the layer.  Decoding a layer decodes its chain.
* **basis** (with step): the channels of each layer (of its delta residual, when delta-coded) are
  turned by an orthonormal basis, the principal components of the calibration rows (a C x C
  covariance summed in float64: memory bounded by C^2 whatever the rows), before quantization, and
  turned back after.  Every component is kept, so the error bound is the step's (an orthonormal map
  keeps distances); the gain is energy compaction: the components past the first few carry little
  energy and round to zero.  The basis is recorded in the spec (float32, base64) and applied in
  float64, so the numpy and torch decoders agree.
* channel pooling happens before encoding (extract pools the features to the declared width); the
  codec only sees the pooled channel count.

Every decoder has a torch twin (:func:`decode_torch`) that runs on any device on the encoded arrays
as read (a GPU student moves the encoded bytes to the device and decodes there); it equals the
numpy decoder bit for bit.
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


F16_MAX = float(torch.finfo(torch.float16).max)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float16 scales of ``x`` (..., N), one scale per leading index: ``absmax / 127``.
    The scale is rounded to float16 first and the values divided by the rounded scale, so the only
    error is the int8 rounding, at most half a scale.  Values decode to float16: a row whose largest
    value float16 cannot hold gets an infinite scale, which extract refuses as it refuses such a
    value in an exact cache (not a finite scale whose decoded values overflow)."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / INT8_MAX).to(torch.float16)
    scale = torch.where(scale.float() * INT8_MAX > F16_MAX, torch.inf, scale).to(torch.float16)
    s = scale.float().unsqueeze(-1)
    q = torch.round(x / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values back from :func:`quantize_int8`."""
    return q.float() * scale.float().unsqueeze(-1)


STEP_LIMIT = 32767  # the largest |q| the zigzag uint16 form holds
QUANTIZE = ("none", "int8", "step")


class StepOverflow(ValueError):
    """A value too large for its quantization step (more than :data:`STEP_LIMIT` steps)."""


@functools.lru_cache(maxsize=32)
def packed_weights(height: int, width: int) -> np.ndarray:
    """(H*W,) how many times each packed number appears in the dense half-spectrum (1, or 2 for a
    number whose mirror the dense form also holds): its weight in the spectral loss, which is a
    mean over the dense form."""
    keep, source, _ = hermitian_maps(height, width)
    counts = np.bincount(source, minlength=height * width + 1)[: height * width]
    return counts.astype(np.float64)


def encoded_shapes(channels: int, height: int, width: int, packed: bool, quantize: str) -> dict[str, tuple]:
    """Part name ('values', 'scale') -> (per-row shape, dtype) of one layer's encoded spectrum."""
    values = (channels, height * width) if packed else (channels, height, width // 2 + 1, 2)
    if quantize == "int8":
        return {"values": (values, "int8"), "scale": ((channels,), "float16")}
    if quantize == "step":
        return {"values": (values, "uint16")}
    return {"values": (values, "float16")}


def zigzag(q: torch.Tensor) -> torch.Tensor:
    """Signed integers (|q| <= STEP_LIMIT) as uint16: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    q = q.to(torch.int32)
    return ((q << 1) ^ (q >> 31)).to(torch.uint16)


def unzigzag(u: np.ndarray) -> np.ndarray:
    """The signed integers (int32) of :func:`zigzag`'s uint16."""
    u = u.astype(np.int32)
    return (u >> 1) ^ -(u & 1)


def quantize_steps(x: torch.Tensor, steps: torch.Tensor, base: torch.Tensor | None = None, basis: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values ``x`` (B, C, H*W) float32 as integers of ``steps`` (H*W,), after subtracting
    ``base`` (the decoded previous layer, for delta coding) and turning the channels by ``basis``;
    returns (zigzag uint16, the decoded float32 values exactly as :func:`dequantize_steps` gives
    them).  Raises StepOverflow past :data:`STEP_LIMIT` steps."""
    r = x - base if base is not None else x
    if basis is not None:
        b = torch.from_numpy(basis_matrix(basis)).to(r.device)
        r = torch.einsum("nch,cd->ndh", r.double(), b).float()
    q = torch.round(r / steps)
    if q.numel() and float(q.abs().max()) > STEP_LIMIT:
        raise StepOverflow(f"a value is {float(q.abs().max()):.0f} steps large (at most {STEP_LIMIT})")
    q = q.to(torch.int32)
    recon = q.to(torch.float32) * steps
    if basis is not None:
        recon = torch.einsum("ndh,cd->nch", recon.double(), b).float()
    return zigzag(q), (recon + base if base is not None else recon)


def dequantize_steps(u: np.ndarray, steps: np.ndarray, base: np.ndarray | None = None,
                     basis: str | None = None) -> np.ndarray:
    """float32 packed values of zigzag integers ``u`` of ``steps``, turned back by ``basis``, plus
    ``base`` (delta coding)."""
    recon = unzigzag(u).astype(np.float32) * np.asarray(steps, dtype=np.float32)
    if basis is not None:
        recon = np.einsum("ndh,cd->nch", recon.astype(np.float64), basis_matrix(basis)).astype(np.float32)
    return recon + base if base is not None else recon


@functools.lru_cache(maxsize=64)
def basis_matrix(encoded: str) -> np.ndarray:
    """The (C, C) float64 channel basis (columns: components) a spec records as base64 float32."""
    import base64

    raw = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    c = int(round(np.sqrt(raw.size)))
    if c * c != raw.size:
        raise ValueError(f"a channel basis of {raw.size} numbers is not square")
    return raw.reshape(c, c).astype(np.float64)


def encode_basis(basis: np.ndarray) -> str:
    """A (C, C) basis as the spec records it: float32 little-endian, base64."""
    import base64

    return base64.b64encode(np.ascontiguousarray(basis, dtype="<f4").tobytes()).decode("ascii")


def fit_basis(values: np.ndarray, height: int, width: int, base: np.ndarray | None = None) -> np.ndarray:
    """The principal components (C, C) float32, by energy, of calibration rows ``values`` (n, C, H*W)
    (their residuals from ``base``), in the loss's metric, uncentred: the channel covariance is
    summed in float64 a row at a time (memory C^2).  Signs fixed (each column's largest entry
    positive) so the basis is the same wherever it is fitted from the same numbers."""
    w = np.sqrt(packed_weights(height, width))
    c = values.shape[1]
    cov = np.zeros((c, c), dtype=np.float64)
    for i in range(len(values)):
        r = values[i].astype(np.float64) - (base[i] if base is not None else 0.0)
        r = r * w
        cov += r @ r.T
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(vals, kind="stable")[::-1]]
    vecs *= np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(c)] < 0, -1.0, 1.0)
    return vecs.astype(np.float32)


def encode(dense: torch.Tensor, width: int, packed: bool, quantize: str, steps: torch.Tensor | None = None,
           base: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A batch of float32 spectra (B, C, H, W//2+1, 2) as the parts :func:`encoded_shapes` names
    ('step': with the layer's table and, delta-coded, its base: see :func:`encode_step`)."""
    if quantize == "step":
        return encode_step(dense, width, steps, base)[0]
    values = pack(dense, width) if packed else dense
    if quantize == "int8":
        q, scale = quantize_int8(values.reshape(*values.shape[:2], -1))
        return {"values": q.reshape(values.shape), "scale": scale}
    return {"values": values.to(torch.float16)}


def encode_step(dense: torch.Tensor, width: int, steps, base: torch.Tensor | None = None, basis: str | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A 'step' layer's parts, and its decoded packed float32 values (the ``base`` of a layer
    delta-coded against it).  The input is the float16 spectrum, what an exact cache holds, so
    re-encoding an exact cache gives the bytes a direct extract gives."""
    values = pack(dense.to(torch.float16).float(), width)
    table = torch.as_tensor(np.asarray(steps, dtype=np.float32)).to(values.device)
    u, recon = quantize_steps(values, table, base, basis)
    return {"values": u}, recon


def decode(parts: dict[str, np.ndarray], height: int, width: int, packed: bool, quantize: str,
           steps=None, base: np.ndarray | None = None, basis: str | None = None) -> np.ndarray:
    """The dense float16 spectra (B, C, H, W//2+1, 2) of a batch of encoded rows as read from disk
    (``base``: the decoded packed float32 values of the layer a delta-coded layer is stored against,
    :func:`decode_packed`)."""
    values = decode_packed(parts, quantize, steps, base, basis) if quantize == "step" else parts["values"]
    if quantize == "int8":
        values = (values.reshape(*values.shape[:2], -1).astype(np.float32)
                  * parts["scale"].astype(np.float32)[..., None]).reshape(values.shape)
    values = values.astype(np.float16, copy=False)
    return unpack(values, height, width) if packed else values


def decode_packed(parts: dict[str, np.ndarray], quantize: str, steps=None, base: np.ndarray | None = None,
                  basis: str | None = None) -> np.ndarray:
    """The packed float32 values of a 'step' layer (the base of the next layer of a delta chain)."""
    if quantize != "step":
        raise ValueError(f"decode_packed: quantize {quantize!r} has no float32 packed form")
    return dequantize_steps(parts["values"], steps, base, basis)


# ----------------------------------------------------------------------------- decoding on any device


def decode_torch(parts: dict[str, torch.Tensor], height: int, width: int, packed: bool, quantize: str,
                 steps=None, base: torch.Tensor | None = None, basis: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`decode` with torch on the parts' device: (dense float16 spectra, and for 'step' the
    packed float32 values a delta-coded next layer adds to).  Equal to the numpy decoder bit for bit:
    the same float32 products and sums, then one rounding to float16."""
    values = parts["values"]
    recon = None
    if quantize == "step":
        q = values.to(torch.int32)
        q = (q >> 1) ^ -(q & 1)
        st = torch.as_tensor(np.asarray(steps, dtype=np.float32)).to(values.device)
        recon = q.to(torch.float32) * st
        if basis is not None:
            b = torch.from_numpy(basis_matrix(basis)).to(values.device)
            recon = torch.einsum("ndh,cd->nch", recon.double(), b).float()
        if base is not None:
            recon = recon + base
        values = recon
    elif quantize == "int8":
        flat = values.reshape(*values.shape[:2], -1).to(torch.float32)
        values = (flat * parts["scale"].to(torch.float32).unsqueeze(-1)).reshape(values.shape)
    values = values.to(torch.float16)
    return (unpack_torch(values, height, width) if packed else values), recon


def decode_layers_torch(spec, encoded: dict[int, dict[str, torch.Tensor]], indices: list[int]
                        ) -> dict[int, torch.Tensor]:
    """Dense float16 spectra of teacher layers ``indices`` from their encoded parts on any device
    (``encoded``: :meth:`cache.reader.Cache.read_encoded_layers` moved to the device), each delta
    chain decoded once, base first.  ``spec``: the cache's :class:`cache.layout.CacheSpec`."""
    by_index = {la.index: la for la in spec.layers}
    recon: dict[str, torch.Tensor | None] = {}
    out = {}
    for i in indices:
        for la in spec.chain(by_index[i]):
            if la.name in recon and la.index != i:
                continue
            base = recon[la.base] if la.base is not None else None
            dense, recon[la.name] = decode_torch(encoded[la.index], la.height, la.width, spec.packed, spec.quantize,
                                                 la.steps, base, la.basis)
            if la.index == i:
                out[i] = dense
    return out


def unpack_torch(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`unpack` with torch on the tensor's device: a gather and a sign flip."""
    _, source, _ = hermitian_maps(height, width)
    ext = torch.cat([packed, packed.new_zeros(*packed.shape[:-1], 1)], dim=-1)
    dense = ext.index_select(-1, torch.from_numpy(source).to(packed.device))
    neg = torch.from_numpy(_negated(height, width)).to(packed.device)
    dense[..., neg] = -dense[..., neg]
    return dense.reshape(*packed.shape[:-1], height, width // 2 + 1, 2)


# ----------------------------------------------------------------------------- calibration


def calibrate_steps(values: np.ndarray, height: int, width: int, error: float, base: np.ndarray | None = None,
                    iterations: int = 30) -> np.ndarray:
    """The quantization table (H*W,) float32 of one layer: ``step / sqrt(weight)`` for each packed
    number (:func:`packed_weights`), with the one ``step`` found by bisection so that the layer's
    relative RMS error on the calibration rows ``values`` ((n, C, H*W) packed float32, the float16
    spectra), ``||w^(1/2) (x - x')|| / ||w^(1/2) x||``, is ``error`` (from below).  ``base``: the
    decoded previous layer of a delta chain (its calibrated values).  numpy float64 sums only, so
    the table is the same on every machine and thread count (a derived tier calibrates to the
    table a direct extract did)."""
    w = packed_weights(height, width)
    root = np.sqrt(w).astype(np.float32)
    x = np.asarray(values, dtype=np.float32)
    energy = float(np.sum((x.astype(np.float64) ** 2) * w))
    if energy == 0.0:
        return (np.ones(height * width, dtype=np.float32) / root).astype(np.float32)
    r = x - base if base is not None else x
    peak = float(np.abs(r).max()) * float(root.max())
    lo, hi = max(peak, 1e-30) / STEP_LIMIT * 4, max(peak, 1e-30) * 4  # headroom: 4x the calibration rows' peak

    def rel_error(step: float) -> float:
        table = (np.float32(step) / root).astype(np.float32)
        d = (r - np.round(r / table) * table).astype(np.float64)
        return float(np.sqrt(np.sum(d * d * w) / energy))

    if rel_error(lo) > error:
        raise StepOverflow(f"a relative error of {error:g} needs steps below 1/{STEP_LIMIT // 4} of the largest value")
    for _ in range(iterations):  # geometric bisection (the step to 2^-12 of its range's ratio, 2^17)
        mid = float(np.sqrt(lo * hi))
        if rel_error(mid) <= error:
            lo = mid
        else:
            hi = mid
    return (np.float32(lo) / root).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _negated(height: int, width: int) -> np.ndarray:
    """Dense positions holding the negated imaginary part of a mirrored bin."""
    return np.flatnonzero(hermitian_maps(height, width)[2] < 0)
