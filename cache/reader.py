"""Reading the cache: refuse the wrong one loudly, serve rows in shard-aligned blocks.

A cache is opened only when its recorded digests hold: the manifest's bytes, the shard index's
bytes and the attributes that decide meaning (layers, row blocks, shapes) hash to what extract
recorded, and every array's metadata, its whole codec chain included, is what the recorded spec
gives it.  A row is read only from a shard
file that exists with the size extract wrote (zarr would read a missing or empty shard as zeros);
zarr's crc32c then checks every chunk's bytes.

A cache on an object store (``extract.location``) is read the same way, object by object: a
shard's index with one ranged GET at the size extract recorded (a missing, emptied or truncated
object is named by that GET, with no HEAD first), then one ranged GET per span of chunks a read
needs (:class:`cache.shardfile.ShardDecoder`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.fingerprint import diff
from pipeline.storage import Location

from .codec import decode, decode_packed
from .forms import FORMS, features_of, spectra_of
from .shardfile import ShardCorrupt, ShardDecoder
from .layout import (FORMAT_VERSION, MANIFEST, SHARD_INDEX, CacheSpec, array_json, layer_array, marker_name,
                     meaning_digest, open_group, shard_key, spec_from_attrs)


CACHE_DIR = "cache.zarr"  # the cache's folder inside an extract output
CACHE_URL = "cache"  # the summary key of an extract record whose cache is on a store: its URL


def cache_path(record) -> Path | str:
    """The cache of a completed extract record (anything with a ``path`` and a ``lock``): the URL
    its summary records when extract wrote it to a store, else ``cache.zarr`` in its folder."""
    url = (getattr(record, "lock", None) or {}).get("summary", {}).get(CACHE_URL)
    return url if url else Path(record.path) / CACHE_DIR


def commit_problems(where) -> list[str]:
    """One line per file of a cache's commit (metadata, manifest, shard index) missing at ``where``
    (a local folder or a store URL), or the store that cannot be reached."""
    store = Location(where)
    names = ("zarr.json", MANIFEST, SHARD_INDEX)
    try:
        present = {n for n in names if (store / n).exists()}
    except OSError as e:
        return [f"{store}: cannot be reached ({e})"]
    return [f"{store / n} is missing" for n in names if n not in present]


def open_cache(extract_record) -> "Cache":
    """The cache of a completed extract record, checked against the record's fingerprint."""
    fp = extract_record.lock["fingerprint"]
    inputs = extract_record.lock.get("inputs")
    return Cache(cache_path(extract_record), expect_fingerprint=fp, expect_inputs=inputs)


@dataclass
class Block:
    """A contiguous row range of one (split, view)."""

    split: str
    view: int
    start: int
    stop: int


class Cache:
    """An opened, complete cache: arrays, manifest columns and the valid mask."""

    def __init__(self, path: str | Path | Location, expect_fingerprint: str | None = None,
                 expect_inputs: dict | None = None):
        self.store = Location(path)
        self.remote = self.store.remote
        self.path = self.store if self.remote else self.store.local  # named in messages; a Path when local
        self.group = _open_group(self.store)
        self._arrays: dict = {}
        self.attrs = dict(self.group.attrs)
        fp = self.attrs.get("fingerprint")
        if expect_fingerprint and fp != expect_fingerprint:
            changed = diff(self.attrs.get("inputs", {}), expect_inputs or {}) if expect_inputs else []
            what = ", ".join(changed[:8]) or "unknown fields"
            raise PipelineError(
                f"{self.path}: cache fingerprint {str(fp)[:12]} does not match this config's "
                f"{expect_fingerprint[:12]} (differs in: {what}); refusing to train on it"
            )
        if not self.attrs.get("complete"):
            raise PipelineError(f"{self.path}: cache is incomplete (an extract was interrupted); rerun extract")
        integrity = self._check_meaning()
        self.spec: CacheSpec = spec_from_attrs(self.attrs["spec"])
        self._check_arrays()
        self._manifest_sha256 = integrity.get("manifest_sha256")
        # checked at open (digest, then the footer's row count): a damaged manifest refuses the cache at once
        rows = pq.read_metadata(pa.BufferReader(_checked_bytes(self.store / MANIFEST, self._manifest_sha256,
                                                               "manifest"))).num_rows
        if rows != self.spec.rows:
            raise PipelineError(f"{self.path / MANIFEST}: {rows} rows, the arrays have {self.spec.rows}")
        self._rows = None
        self._shard_bytes = self._shard_sizes(integrity.get("shard_index_sha256"))
        self._check_markers()
        self._checked: set[tuple[str, int]] = set()
        self._decoders: dict[str, ShardDecoder | None] = {}
        self.one_pass = True  # False: every read goes through zarr (benchmarks/distill.py compares)
        self.blocks = [Block(**b) for b in self.attrs["blocks"]]
        self._valid: np.ndarray | None = None
        self._chain: dict[tuple[str, int, int], np.ndarray] = {}  # decoded delta bases of the last row range

    def _shard_sizes(self, sha256: str | None) -> dict[str, np.ndarray]:
        """Array name -> the size extract wrote of each of its shard files (-1: not recorded)."""
        index = _read_table(self.store / SHARD_INDEX, sha256, "shard index")
        names = index.column("array").to_numpy(zero_copy_only=False)
        shards, nbytes = index.column("shard").to_numpy(), index.column("nbytes").to_numpy()
        out = {}
        for name in self.spec.arrays():
            sizes = np.full(self.spec.num_shards, -1, dtype=np.int64)
            mine = (names == name) & (shards < self.spec.num_shards)
            sizes[shards[mine]] = nbytes[mine]
            out[name] = sizes
        return out

    def _check_markers(self) -> None:
        """Refuse a cache with a shard whose completion marker is gone (one listing): markers are
        part of the commit, and a reader trusts only committed shards."""
        from .writer import completed_shards

        missing = sorted(set(range(self.spec.num_shards)) - completed_shards(self.store))
        if missing:
            raise PipelineError(f"{self.path / marker_name(missing[0])}: shard {missing[0]} is not marked complete"
                                f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; the cache is "
                                f"damaged or was not written to the end (rerun extract)")

    def _check_meaning(self) -> dict:
        """The recorded integrity digests, after checking the attributes that decide meaning."""
        where = self.path / "zarr.json"
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise PipelineError(f"{where}: cache format {self.attrs.get('format_version')} is not this version's "
                                f"{FORMAT_VERSION}; rerun extract --force")
        integrity = self.attrs.get("integrity") or {}
        if integrity.get("meaning_sha256") != meaning_digest(self.attrs):
            raise PipelineError(f"{where}: the attributes that decide meaning (layers, blocks, spec) were changed "
                                f"after extract wrote them; refusing the cache (rerun extract --force)")
        return integrity

    def _check_arrays(self) -> None:
        """Every array's metadata against what the recorded spec gives it (:meth:`CacheSpec.array_metadata`):
        shape, dtype and shards first, then all of it, the full codec chain included (a removed
        crc32c would switch the chunks' checksums off)."""
        for name, (row_shape, dtype) in self.spec.arrays().items():
            arr = self.array(name)
            want = (self.spec.rows, *row_shape)
            shards = getattr(arr, "shards", None) or arr.chunks
            where = self.path / name / "zarr.json"
            if (tuple(arr.shape) != want or str(arr.dtype) != dtype or tuple(shards) != (self.spec.rows_per_shard,
                                                                                           *row_shape)):
                raise PipelineError(
                    f"{where}: array is {tuple(arr.shape)} {arr.dtype} in shards of "
                    f"{tuple(shards)}, the cache records {want} {dtype} in shards of "
                    f"{(self.spec.rows_per_shard, *row_shape)}; refusing the cache"
                )
            changed = diff(self.spec.array_metadata(name), array_json(arr))
            if changed:
                raise PipelineError(
                    f"{where}: the array's metadata is not what the cache's spec gives it (differs in: "
                    f"{', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); refusing the cache "
                    f"(rerun extract --force)"
                )

    @property
    def manifest(self) -> pa.Table:
        """The manifest, read and checked against its digest on each access (not kept: at scale it
        is the largest table of a process, and readers turn it into their own columns once)."""
        return _read_table(self.store / MANIFEST, self._manifest_sha256, "manifest")

    @property
    def layers(self):
        return {l.index: l for l in self.spec.layers}

    def layer(self, index: int):
        layers = self.layers
        if index not in layers:
            raise PipelineError(
                f"{self.path}: teacher layer {index} is not in the cache (cached: {sorted(layers)})"
            )
        return layers[index]

    def read_layer(self, form: str, index: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of teacher layer ``index`` in ``form``: 'spectra', the dense spectra
        (rows, C, H, W//2+1, 2) float16 at the stored width whatever their encoding, or 'features',
        the maps (rows, C, H, W).  A form the cache does not store is computed from the one it does
        (:mod:`cache.forms`, float32): features from a spectral cache come at its stored width."""
        if form not in FORMS:
            raise PipelineError(f"read_layer: form {form!r} is not one of {', '.join(FORMS)}")
        stored = [f for f in FORMS if f in self.spec.store]
        if not stored:
            raise PipelineError(f"{self.path}: the cache stores no teacher layers (extract.store = "
                                f"{list(self.spec.store)})")
        layer = self.layer(index)
        source = form if form in stored else stored[0]
        if source == "features":
            values = self.read(layer_array("features", layer.name), start, stop)
        else:
            base = self._base_values(layer, start, stop)
            values = decode(self.read_encoded(index, start, stop), layer.height, layer.width, self.spec.packed,
                            self.spec.quantize, layer.steps, base, layer.basis)
        if source == form:
            return values
        return features_of(values, layer.width) if form == "features" else spectra_of(values)

    def read_encoded(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of teacher layer ``index``'s spectrum as stored (part -> array, checked
        and decompressed, not decoded): what a GPU student moves to the device and decodes there
        (:func:`cache.codec.decode_torch`; a delta-coded layer needs its chain, ``spec.chain``)."""
        layer = self.layer(index)
        return {part: self.read(name, start, stop) for part, name in self.spec.spectrum_parts(layer).items()}

    def read_encoded_layers(self, indices: list[int], start: int, stop: int) -> dict[int, dict[str, np.ndarray]]:
        """:meth:`read_encoded` of teacher layers ``indices`` and of every layer their delta chains
        need, by teacher layer index (the input of :func:`cache.codec.decode_layers_torch`)."""
        need = {la.index for i in indices for la in self.spec.chain(self.layer(i))}
        return {i: self.read_encoded(i, start, stop) for i in sorted(need)}

    def _base_values(self, layer, start: int, stop: int) -> np.ndarray | None:
        """The decoded packed float32 values of the layer a delta-coded ``layer`` is stored against
        (its chain decoded once per row range: a unit's layers are read one after another)."""
        if layer.base is None:
            return None
        key = (layer.base, start, stop)
        if key not in self._chain:
            base = self.spec.layer_named(layer.base)
            values = decode_packed(self.read_encoded(base.index, start, stop), self.spec.quantize, base.steps,
                                   self._base_values(base, start, stop), base.basis)
            self._chain = {k: v for k, v in self._chain.items() if k[1:] == (start, stop)}
            self._chain[key] = values
        return self._chain[key]

    def require_width(self, index: int, channels: int, who: str) -> None:
        """Refuse a student layer of another width than a pooled layer's (a wider student than the
        stored width is refused before training by the trainer's pair checks)."""
        layer = self.layer(index)
        if layer.pooled is not None and channels != layer.pooled:
            raise PipelineError(
                f"{who}: the cache stores teacher layer {index} pooled to {layer.pooled} channels "
                f"(extract.compress.pool), so it serves students of exactly that width; this one has {channels}"
            )

    def target_bytes_per_row(self, layers: list[int], widths: dict[int, int] | None = None) -> int:
        """Bytes per row of the logits and the dense spectra of teacher layers ``layers`` once decoded:
        float16 at the stored width, float32 for a layer pooled to ``widths[layer]`` channels."""
        out = self.spec.bytes_per_row()["logits"]
        for t in set(layers):
            shape = self.layer(t).spectrum_shape()
            w = (widths or {}).get(t, shape[0])
            out += int(np.prod(shape)) * 2 if w == shape[0] else int(np.prod(shape[1:])) * w * 4
        return out

    def array(self, name: str):
        """Array ``name``, its metadata read once per cache (each read is a GET on a store)."""
        if name in self._arrays:
            return self._arrays[name]
        try:
            self._arrays[name] = self.group[name]
            return self._arrays[name]
        except KeyError:
            raise PipelineError(f"{self.path}: no array {name!r} in the cache") from None
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise PipelineError(f"{self.path / name / 'zarr.json'}: cannot read the array's metadata "
                                f"({type(e).__name__}: {e})") from None

    @property
    def valid(self) -> np.ndarray:
        if self._valid is None:
            self._valid = self.read("valid", 0, self.spec.rows).astype(bool)
        return self._valid

    def shard_file(self, name: str, s: int) -> Path | Location:
        f = self.store / name / shard_key(self.array(name), s)
        return f if self.remote else f.local

    def _recorded_size(self, name: str, s: int) -> int | None:
        sizes = self._shard_bytes.get(name)
        return int(sizes[s]) if sizes is not None and 0 <= s < len(sizes) and sizes[s] >= 0 else None

    def _damaged(self, name: str, s: int, what: str) -> PipelineError:
        return PipelineError(f"{self.shard_file(name, s)}: shard {s} of {name} {what}; the cache is damaged "
                             f"(run `python -m pipeline verify`, then extract with --force)")

    def check_shard_file(self, name: str, s: int) -> None:
        """Refuse shard ``s`` of ``name`` unless its file exists with the size extract wrote (a stat
        locally, a HEAD on a store)."""
        if (name, s) in self._checked:
            return
        want = self._recorded_size(name, s)
        got = Location(self.shard_file(name, s)).size()
        if want is None or got != want:
            raise self._damaged(name, s, "is missing" if got is None else f"is {got} bytes, extract wrote {want}")
        self._checked.add((name, s))

    def decoder(self, name: str) -> ShardDecoder | None:
        """The one-pass reader of array ``name`` (None: ``one_pass`` off, or a compressor of the spec's
        chain, checked at open, that only zarr decodes).  It reads each shard's index at the size
        extract recorded."""
        if not self.one_pass:
            return None
        if name not in self._decoders:
            self._decoders[name] = ShardDecoder.for_array(self.array(name), self.store / name,
                                                          sizes=self._shard_bytes.get(name))
        return self._decoders[name]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array; a missing, resized or corrupt shard file is named.
        Shard files are read in one pass each (:class:`cache.shardfile.ShardDecoder`), every
        chunk's crc32c checked (the chain, crc32c included, was checked at open, so a read through
        zarr checks them too).  Locally each shard file's size is checked once first; on a store
        the decoder's ranged GET of the index at the recorded size is that check (no HEAD)."""
        rps = self.spec.rows_per_shard
        shards = range(start // rps, (max(start, stop - 1)) // rps + 1)
        dec = self.decoder(name)
        for s in shards:
            if dec is None or not self.remote:
                self.check_shard_file(name, s)
            elif self._recorded_size(name, s) is None:
                raise self._damaged(name, s, "has no recorded size")
        try:
            return dec.read(start, stop) if dec is not None else self.array(name)[start:stop]
        except FileNotFoundError:
            s = next(s for s in shards if Location(self.shard_file(name, s)).size() is None)
            raise self._damaged(name, s, "is missing") from None
        except ShardCorrupt as e:
            raise PipelineError(f"{self.path}/{name}: shard {e.shard} is corrupt ({e.why} in {e.path}, reading rows "
                                f"{start}..{stop - 1}); run `python -m pipeline verify` and rerun extract with --force"
                                ) from None
        except ValueError as e:  # zarr's reads
            if "checksum" in str(e).lower():
                s0 = start // self.spec.rows_per_shard
                s1 = (max(start, stop - 1)) // self.spec.rows_per_shard
                where = f"shard {s0}" if s0 == s1 else f"shards {s0}..{s1}"
                raise PipelineError(
                    f"{self.path}/{name}: {where} is corrupt (checksum mismatch in rows {start}..{stop - 1}); "
                    f"run `python -m pipeline verify` and rerun extract with --force"
                ) from None
            raise

    def block(self, split: str, view: int = 0) -> Block:
        for b in self.blocks:
            if b.split == split and b.view == view:
                return b
        raise PipelineError(f"{self.path}: no rows for split {split!r} view {view}")

    def view_count(self, split: str = "train") -> int:
        return sum(1 for b in self.blocks if b.split == split)

    def chunk_rows(self) -> int:
        """Rows per read unit: the smallest inner chunk among the arrays (reads stay chunk-aligned)."""
        return min(self.array(n).chunks[0] for n in self.spec.arrays())

    def rows(self):
        """The manifest's rows as columns (:func:`cache.manifest.rows_of_manifest`), read once and
        shared by every reader of this cache (students train from the same rows)."""
        from .manifest import rows_of_manifest

        if self._rows is None:
            self._rows = rows_of_manifest(self.manifest, self.path if not self.remote else str(self.store))
        return self._rows

    def column(self, name: str) -> np.ndarray:
        """One manifest column (reads the manifest: take ``manifest`` once for several columns)."""
        return self.manifest.column(name).to_numpy(zero_copy_only=False)


def _open_group(path: Location):
    """The cache's Zarr group, read-only; a missing or unreadable zarr.json is named."""
    try:
        return open_group(path, mode="r")
    except FileNotFoundError:
        raise PipelineError(f"{path}: no cache here; run extract") from None
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        why = f"{type(e).__name__}: {e}"
        raise PipelineError(f"{path / 'zarr.json'}: cannot read the cache's metadata ({why})") from None


def _checked_bytes(path: Location, sha256: str | None, what: str) -> bytes:
    """The bytes of a file of the cache, after checking them against the recorded digest."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: cannot read the {what} (it is missing)") from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise PipelineError(f"{path}: the {what} is not the one extract wrote (sha256 mismatch); refusing the cache "
                            f"(rerun extract --force)")
    return data


def _read_table(path: Location, sha256: str | None, what: str) -> pa.Table:
    """A Parquet file of the cache, its bytes checked against the recorded digest."""
    data = _checked_bytes(path, sha256, what)
    try:
        return pq.read_table(pa.BufferReader(data))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the {what} ({e})") from None
