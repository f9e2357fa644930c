"""The on-disk cache layout: the only place that knows array names, shapes, chunks and codecs.

One Zarr v3 group per extract fingerprint::

    logits              (rows, num_classes)          float16
    spectra/<layer>     (rows, C, H*W)               float16   rfft2(norm="ortho"), Hermitian-packed
                                                               (cache.codec); int8 with extract.compress.quantize,
                                                               (rows, C, H, W//2+1, 2) with packed: false
    spectra_scale/<layer> (rows, C)                  float16   int8 scales, with quantize: int8 only
                                                               (quantize: step: (rows, C, H*W) uint16, zigzag
                                                               integers of the layer's step table, see cache.codec)
    features/<layer>    (rows, C, H, W)              float16   when extract.store has 'features'
    valid               (rows,)                      uint8     1 = teacher saw the row's view
    manifest.parquet    row -> key, split, label, view, view parameters, source location, shard
    _complete/<s>.json  written after shard s is durably on disk, with each shard file's size
    shards.parquet      (array, shard, nbytes) of every shard file, written when the cache is complete
    zarr.json attrs     fingerprint, inputs, config, teacher identity, layers, row blocks, versions,
                        integrity: sha256 of the manifest, of the shard index, of what decides meaning

A row is one (sample, view).  Arrays share one row sharding (``rows_per_shard``): a Zarr shard of
rows is the unit of writing, resuming and verifying.  Inner chunks are sized near
``chunk_bytes`` and carry a crc32c checksum after compression.  C is the teacher layer's width, or
the width ``extract.compress.pool`` declares for it.  Readers get dense spectra (``Cache.read_layer``)
whatever the encoding.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np

from .codec import encoded_shapes

MANIFEST = "manifest.parquet"
SHARD_INDEX = "shards.parquet"
COMPLETE_DIR = "_complete"
FORMAT_VERSION = 3  # 2: shard sizes and digests checked by readers; 3: encoded spectra (cache.codec)

# root attributes that decide what a row's bytes mean; their digest is recorded and checked
MEANING_KEYS = ("spec", "blocks", "layers", "views", "num_shards", "image_size", "mean", "std", "spectrum",
                "format_version")


def chunk_rows(rows_per_shard: int, row_bytes: int, chunk_bytes: int) -> int:
    """Largest divisor of rows_per_shard whose chunk stays within chunk_bytes (at least 1)."""
    best = 1
    for n in range(1, rows_per_shard + 1):
        if rows_per_shard % n == 0 and n * row_bytes <= chunk_bytes:
            best = n
    return best


@dataclass(frozen=True)
class LayerSpec:
    index: int
    name: str
    channels: int
    height: int
    width: int
    pooled: int | None = None  # the width the cache stores this layer's spectra at (None: teacher width)
    # quantize 'step': the layer's quantization table, one step per packed number (cache.codec)
    steps: tuple[float, ...] | None = None
    # delta coding: the cached layer this one is stored as a difference from (None: stored alone)
    base: str | None = None
    # quantize 'step' with a channel basis: the (C, C) basis, float32 base64 (cache.codec.basis_matrix)
    basis: str | None = None

    @property
    def stored_channels(self) -> int:
        return self.pooled or self.channels

    def spectrum_shape(self) -> tuple[int, ...]:
        """The dense spectrum a reader gets per row (at the stored width)."""
        return (self.stored_channels, self.height, self.width // 2 + 1, 2)

    def feature_shape(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)


@dataclass
class CacheSpec:
    rows: int
    rows_per_shard: int
    num_classes: int
    layers: list[LayerSpec]
    store: tuple[str, ...] = ("logits", "spectra")
    chunk_bytes: int = 1 << 20
    compressor: str = "zstd"
    clevel: int = 1
    packed: bool = True
    quantize: str = "none"
    error: float | None = None  # quantize 'step': each layer's relative RMS error the steps were calibrated to

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.rows_per_shard))

    def shard_rows(self, s: int) -> tuple[int, int]:
        a = s * self.rows_per_shard
        return a, min(self.rows, a + self.rows_per_shard)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (per-row shape, dtype) for every array this cache holds."""
        out: dict[str, tuple[tuple[int, ...], str]] = {"logits": ((self.num_classes,), "float16")}
        for layer in self.layers:
            if "spectra" in self.store:
                for part, name in self.spectrum_parts(layer).items():
                    out[name] = self.encoded_shapes(layer)[part]
            if "features" in self.store:
                out[layer_array("features", layer.name)] = (layer.feature_shape(), "float16")
        out["valid"] = ((), "uint8")
        return out

    def encoded_shapes(self, layer: LayerSpec) -> dict[str, tuple[tuple[int, ...], str]]:
        """Part ('values', 'scale') -> (per-row shape, dtype) of a layer's encoded spectrum."""
        return encoded_shapes(layer.stored_channels, layer.height, layer.width, self.packed, self.quantize)

    def spectrum_parts(self, layer: LayerSpec) -> dict[str, str]:
        """Part -> array name of a layer's encoded spectrum."""
        kinds = {"values": "spectra", "scale": "spectra_scale"}
        return {part: layer_array(kinds[part], layer.name) for part in self.encoded_shapes(layer)}

    def layer_named(self, name: str) -> LayerSpec:
        return next(la for la in self.layers if la.name == name)

    def chain(self, layer: LayerSpec) -> list[LayerSpec]:
        """The layers decoding ``layer`` needs, base first, ``layer`` last (itself alone unless
        delta-coded)."""
        out = [layer]
        while out[0].base is not None:
            out.insert(0, self.layer_named(out[0].base))
        return out

    def lossless(self, layer: LayerSpec) -> bool:
        """Whether a reader gets the layer's spectra as extract computed them (up to float16)."""
        return layer.pooled is None and self.quantize == "none"

    def layer_arrays(self, kind: str) -> dict[str, int]:
        """Array name -> position in ``layers`` of every stored array of ``kind`` ('spectra' (the
        values array of each encoded spectrum) or 'features'); empty when the cache does not store that kind."""
        if kind not in self.store:
            return {}
        return {layer_array(kind, layer.name): i for i, layer in enumerate(self.layers)}

    def chunk_rows(self, row_shape: tuple[int, ...], dtype: str) -> int:
        """Inner-chunk rows for an array of this cache (see :func:`chunk_rows`)."""
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return chunk_rows(self.rows_per_shard, row_bytes, self.chunk_bytes)

    def compressors(self):
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        if self.compressor == "zstd":
            comp = ZstdCodec(level=self.clevel)
        else:  # "blosc" (zstd inside) or "blosc-lz4", both over bit-shuffled values
            cname = "lz4" if self.compressor == "blosc-lz4" else "zstd"
            comp = BloscCodec(cname=cname, clevel=self.clevel, shuffle="bitshuffle")
        return [comp, Crc32cCodec()]

    def array_args(self, name: str) -> dict:
        """The keyword arguments of ``zarr.Group.create_array`` that make array ``name``: its shape,
        dtype, inner chunks (:meth:`chunk_rows`), row shards, codecs (:meth:`compressors`, crc32c
        last), fill value 0 and dimension names.  The reader compares every array's metadata with
        what these give (:meth:`array_metadata`)."""
        shape, dtype = self.arrays()[name]
        return {"shape": (self.rows, *shape), "dtype": dtype, "chunks": (self.chunk_rows(shape, dtype), *shape),
                "shards": (self.rows_per_shard, *shape), "compressors": self.compressors(), "fill_value": 0,
                "dimension_names": ["row", *[f"d{i}" for i in range(len(shape))]]}

    def array_metadata(self, name: str) -> dict:
        """The metadata (``zarr.json`` parsed, attributes left out) that :meth:`array_args` give array
        ``name``: zarr builds it in memory from those arguments, so the codec chain (the sharding
        codec, its inner codecs and their configurations, the index codecs, every crc32c) is zarr's own
        serialization of this spec."""
        import zarr

        args = self.array_args(name)
        key = repr({**args, "compressors": [c.to_dict() for c in args["compressors"]]})
        if key not in _METADATA:
            arr = zarr.open_group(zarr.storage.MemoryStore(), mode="w").create_array("a", **args)
            _METADATA[key] = array_json(arr)
        return copy.deepcopy(_METADATA[key])

    def bytes_per_row(self) -> dict[str, int]:
        return {
            name: int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            for name, (shape, dt) in self.arrays().items()
        }


_METADATA: dict[str, dict] = {}  # CacheSpec.array_metadata by its arguments: built once per process


def array_json(arr) -> dict:
    """An open array's metadata as zarr serializes it into ``zarr.json`` (parsed), attributes left out."""
    from zarr.core.buffer import default_buffer_prototype

    raw = arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    meta = json.loads(raw)
    meta.pop("attributes", None)
    return meta


def layer_array(kind: str, layer_name: str) -> str:
    """The array holding ``kind`` ('spectra' or 'features') of a teacher layer."""
    return f"{kind}/{layer_name}"


def root_attributes(fingerprint: str, inputs: dict, config: dict, teacher: dict, spec: CacheSpec, views: int,
                    blocks: list[dict], data, skipped: list[dict], versions: dict) -> dict:
    """The cache's root attributes: identity (fingerprint, inputs, config, teacher, versions), what
    decides the rows' meaning (layers, views, row blocks, image size, normalization, the spectrum's
    definition: see :data:`MEANING_KEYS`) and the samples extract skipped.  The writer adds the
    spec, the format version and the integrity digests."""
    return {
        "fingerprint": fingerprint,
        "inputs": inputs,
        "config": config,
        "teacher": teacher,
        "layers": [{"index": la.index, "name": la.name, "shape": [la.channels, la.height, la.width]}
                   for la in spec.layers],
        "views": views,
        "blocks": blocks,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "spectrum": {"fft": "rfft2", "axes": ["H", "W"], "norm": "ortho", "compute_dtype": "float32",
                     "last_axis": ["real", "imag"]},
        "skipped_samples": skipped,
        "versions": versions,
    }


def spec_to_attrs(spec: CacheSpec) -> dict:
    return {
        "rows": spec.rows,
        "rows_per_shard": spec.rows_per_shard,
        "num_classes": spec.num_classes,
        "layers": [_layer_attrs(la) for la in spec.layers],
        "store": list(spec.store),
        "chunk_bytes": spec.chunk_bytes,
        "compressor": spec.compressor,
        "clevel": spec.clevel,
        "packed": spec.packed,
        "quantize": spec.quantize,
        **({"error": spec.error} if spec.error is not None else {}),
    }


def spec_from_attrs(a: dict) -> CacheSpec:
    return CacheSpec(
        rows=a["rows"],
        rows_per_shard=a["rows_per_shard"],
        num_classes=a["num_classes"],
        layers=[_layer_spec(la) for la in a["layers"]],
        store=tuple(a["store"]),
        chunk_bytes=a["chunk_bytes"],
        compressor=a["compressor"],
        clevel=a["clevel"],
        packed=a["packed"],
        quantize=a["quantize"],
        error=a.get("error"),
    )


def open_group(where, mode: str):
    """The Zarr group at ``where`` (a local folder, a store URL or a :class:`pipeline.storage.Location`),
    opened with this process's store options (:func:`pipeline.storage.configure`) when it is on a store."""
    import zarr

    from pipeline import storage

    url = str(where)
    if storage.is_url(url):
        return zarr.open_group(url, mode=mode, storage_options=storage.options())
    return zarr.open_group(url, mode=mode)


def _layer_attrs(layer: LayerSpec) -> dict:
    """A LayerSpec as attributes; the codec's fields only where set (older caches lack them)."""
    a = dict(layer.__dict__)
    for k in ("steps", "base", "basis"):
        if a[k] is None:
            del a[k]
    if a.get("steps") is not None:
        a["steps"] = list(a["steps"])
    return a


def _layer_spec(a: dict) -> LayerSpec:
    """A LayerSpec from its attributes (JSON lists back to tuples, so specs compare equal)."""
    steps = a.get("steps")
    return LayerSpec(**{**a, "steps": tuple(float(v) for v in steps) if steps is not None else None})


def marker_name(s: int) -> str:
    return f"{COMPLETE_DIR}/{s:06d}.json"


def shard_key(arr, s: int) -> str:
    """The store key (relative to the array's folder) of shard ``s`` of a row-sharded array."""
    return arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))


def meaning_digest(attrs: dict) -> str:
    """sha256 of the root attributes that decide what the arrays mean (layer names, row blocks, ...)."""
    from pipeline.fingerprint import fingerprint

    return fingerprint({k: attrs.get(k) for k in MEANING_KEYS})
