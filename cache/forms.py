"""The two forms a cached teacher layer is read in, each computed from the other when the cache
stores only one: the dense spectrum (rows, C, H, W//2+1, 2), real and imaginary parts on the last
axis, and the feature map (rows, C, H, W).

The spectrum is ``rfft2(X, norm="ortho")`` over (H, W), invertible with ``irfft2`` of the same norm
and size, so a spectral cache serves spatial losses and a features cache spectral ones.  numpy
only (reader threads stay free of torch's thread pool), float32 out.
"""

from __future__ import annotations

import numpy as np

FORMS = ("spectra", "features")


def features_of(spectra: np.ndarray, width: int) -> np.ndarray:
    """(rows, C, H, W//2+1, 2) -> (rows, C, H, ``width``) float32: the inverse rfft2 (norm="ortho")."""
    z = np.empty(spectra.shape[:-1], dtype=np.complex64)
    z.real, z.imag = spectra[..., 0], spectra[..., 1]
    return np.fft.irfft2(z, s=(spectra.shape[-3], width), norm="ortho").astype(np.float32, copy=False)


def spectra_of(features: np.ndarray) -> np.ndarray:
    """(rows, C, H, W) -> (rows, C, H, W//2+1, 2) float32: rfft2 (norm="ortho") as (real, imag)."""
    z = np.fft.rfft2(np.asarray(features, dtype=np.float32), norm="ortho")
    return np.stack([z.real, z.imag], axis=-1).astype(np.float32, copy=False)
