"""How a cache's spectra are encoded layer by layer: delta chains, calibrated tables, the encoded parts.

:mod:`cache.codec` encodes one layer; this module applies it to a cache's layers in order as its
:class:`cache.layout.CacheSpec` says.  Extract (from the teacher's spectra) and the derived tiers
(from an exact cache's) both encode through :func:`encoded_layers` and calibrate through
:func:`calibrated_spec`, so a tier holds the bytes a direct extract with its encoding writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.storage import Location

from .codec import StepOverflow, calibrate_steps, encode, encode_basis, encode_step, fit_basis
from .layout import CacheSpec, LayerSpec, spec_from_attrs
from .writer import resumable_attrs


def encoded_layers(spec: CacheSpec, dense: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Position in ``spec.layers`` -> encoded parts (:func:`cache.codec.encode`) of the dense float32
    spectra ``dense`` (by layer name), layers in order so that a delta-coded layer finds its base's
    decoded values.  Extract and the derived tiers (``stages.tier``) both encode through here."""
    out, recon = {}, {}
    for i, layer in enumerate(spec.layers):
        if layer.name not in dense:
            continue
        if spec.quantize == "step":
            try:
                out[i], recon[layer.name] = encode_step(dense[layer.name], layer.width, layer.steps,
                                                        recon[layer.base] if layer.base is not None else None,
                                                        layer.basis)
            except StepOverflow as e:
                raise PipelineError(f"spectra/{layer.name}: {e}: a row far outside the calibration rows' range; "
                                    f"raise compress.calibrate_rows or compress.error") from None
        else:
            out[i] = encode(dense[layer.name], layer.width, spec.packed, spec.quantize)
    return out


def resumed_spec(path: Path, fingerprint: str, forced: bool) -> CacheSpec | None:
    """The spec (calibrated tables included) of the partial cache at ``path`` that a run with this
    fingerprint resumes: a resumed run must encode with the tables its finished shards used."""
    attrs = None if forced else resumable_attrs(path, fingerprint)
    return spec_from_attrs(attrs["spec"]) if attrs else None


def chained_layers(layers: list[LayerSpec], delta: bool) -> list[LayerSpec]:
    """The layers with their delta-coding bases: with ``delta``, a layer whose block directly
    follows the previous cached layer's, at the same stored shape, is stored against it."""
    out = []
    for prev, layer in zip([None, *layers], layers):
        chained = (delta and prev is not None and layer.index == prev.index + 1
                   and (layer.stored_channels, layer.height, layer.width)
                   == (prev.stored_channels, prev.height, prev.width))
        out.append(dataclasses.replace(layer, base=prev.name if chained else None))
    return out


def calibrated_spec(spec: CacheSpec, packed: dict[str, np.ndarray], delta: bool, basis: bool = False) -> CacheSpec:
    """``spec`` with each layer's quantization table (:func:`cache.codec.calibrate_steps`) fitted to
    ``spec.error`` on the calibration rows' packed float32 values (``packed``, by layer name; the
    float16 spectra), delta bases chained first and each base's calibrated reconstruction used; with
    ``basis``, each layer's channel basis (:func:`cache.codec.fit_basis`) fitted first and the table
    calibrated on the components."""
    layers, recon = [], {}
    for layer in chained_layers(spec.layers, delta):
        x = packed[layer.name]
        base = recon.get(layer.base) if layer.base is not None else None
        b = fit_basis(x, layer.height, layer.width, base).astype(np.float64) if basis else None

        def turned(v, b=b):
            return v if b is None or v is None else np.einsum("nch,cd->ndh", v.astype(np.float64), b).astype(np.float32)

        try:
            steps = calibrate_steps(turned(x), layer.height, layer.width, spec.error, turned(base))
        except StepOverflow as e:
            raise PipelineError(f"compress.error: {spec.error:g} for layer {layer.index} ({layer.name}): {e}; "
                                f"allow a larger error") from None
        r = turned(x - base if base is not None else x)
        back = np.round(r / steps).astype(np.float32) * steps
        if b is not None:
            back = np.einsum("ndh,cd->nch", back.astype(np.float64), b).astype(np.float32)
        recon[layer.name] = back + base if base is not None else back
        layers.append(dataclasses.replace(layer, steps=tuple(float(v) for v in steps),
                                          basis=encode_basis(b) if b is not None else None))
    return dataclasses.replace(spec, layers=layers)


def cache_sizes(where, spec: CacheSpec) -> dict:
    """The cache's bytes at ``where`` (a folder, a store URL or a :class:`pipeline.storage.Location`:
    one listing), and per cached layer array its bytes per view (a spectrum's scales included) and
    its compression against the float32 dense form at teacher width."""
    files = Location(where).files()

    def nbytes(prefix: str = "") -> int:
        return sum(v for k, v in files.items() if not prefix or k.startswith(prefix + "/"))

    raw32, stored = {}, {}
    for name, i in spec.layer_arrays("spectra").items():
        layer = spec.layers[i]
        raw32[name] = 4 * layer.channels * layer.height * (layer.width // 2 + 1) * 2
        stored[name] = sum(nbytes(n) for n in spec.spectrum_parts(layer).values())
    for name, i in spec.layer_arrays("features").items():
        layer = spec.layers[i]
        raw32[name] = 4 * layer.channels * layer.height * layer.width
        stored[name] = nbytes(name)
    return {"cache_bytes": nbytes(),
            "bytes_per_view": {n: round(stored[n] / spec.rows, 1) for n in stored},
            "compression_vs_float32": {n: round(raw32[n] * spec.rows / max(1, stored[n]), 2) for n in stored}}
