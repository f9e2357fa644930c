"""Writing and reading Zarr v3 shard files in a single pass, without zarr's per-call machinery.

A cache writer always writes whole shards of arrays that are chunked along rows only, which is
the simplest case of the ``sharding_indexed`` codec (Zarr v3 spec, sharding extension): every
inner chunk is encoded by the inner codec chain (``bytes`` little-endian, a compressor,
``crc32c``), the encoded chunks are concatenated, and the index (one little-endian ``uint64``
(offset, nbytes) pair per inner chunk in C order, ``2**64 - 1`` for an absent chunk) follows at
the end with its own crc32c.  zarr-python spends several milliseconds of Python per array per
assignment here, which is as much as compressing the data; this module does the same encoding
with numcodecs directly and writes the file whole (:meth:`pipeline.storage.Location.write_bytes`:
atomically on the local disk, one PUT on an object store).

:class:`ShardDecoder` is the mirror for reads: per shard, one read of the index (kept for later
reads) and one of the span of inner chunks the rows need, every crc32c checked before
decompression.  On an object store each read is one ranged GET, and the index is read at the
size extract recorded for the shard, so a missing, truncated or extended object is named without
a HEAD request.

``for_array`` reads the array's own metadata (:func:`row_sharded_layout`) and returns ``None`` for
any codec chain it does not know, in which case the cache falls back to zarr.  Files written here
are read by plain ``zarr.open_group`` like any other, and files zarr wrote are read here (tests
check both ways).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np

from pipeline.storage import Location

EMPTY = np.uint64(2**64 - 1)
INDEX_BUDGET = 16 << 20  # bytes of shard indexes a decoder keeps (16 bytes per inner chunk)


def _crc(b) -> bytes:
    return struct.pack("<I", google_crc32c.value(b))


def _compressor(conf: dict, dtype: np.dtype) -> Callable[[np.ndarray], bytes] | None:
    name, c = conf["name"], conf.get("configuration", {})
    if name == "zstd":
        from numcodecs import Zstd

        z = Zstd(level=int(c.get("level", 0)), checksum=bool(c.get("checksum", False)))
        return lambda a: bytes(z.encode(a))
    if name == "blosc":
        from numcodecs import Blosc

        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        if c.get("shuffle") not in shuffle or int(c.get("typesize", dtype.itemsize)) != dtype.itemsize:
            return None
        b = Blosc(cname=c.get("cname", "zstd"), clevel=int(c.get("clevel", 5)),
                  shuffle=shuffle[c["shuffle"]], blocksize=int(c.get("blocksize", 0)))
        return lambda a: bytes(b.encode(a))
    return None


def row_sharded_layout(arr) -> dict | None:
    """The layout of ``arr`` when it is the one this module reads and writes: a Zarr v3 array
    sharded and chunked along rows only, inner chain ``bytes`` (little-endian) -> a compressor ->
    ``crc32c``, the index at the end as ``bytes`` + ``crc32c``, fill value 0.  None otherwise."""
    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3:
        return None
    d = meta.to_dict()
    codecs = d.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    dtype = np.dtype(arr.dtype)
    shard_shape = tuple(d["chunk_grid"]["configuration"]["chunk_shape"])
    chunk_shape = tuple(conf["chunk_shape"])
    shape = tuple(arr.shape)
    if (
        conf.get("index_location", "end") != "end"
        or [c["name"] for c in conf.get("index_codecs", [])] != ["bytes", "crc32c"]
        or conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little"
        or shard_shape[1:] != shape[1:]
        or chunk_shape[1:] != shape[1:]
        or shard_shape[0] % chunk_shape[0] != 0
        or d.get("fill_value") not in (0, 0.0)
        or d.get("storage_transformers")
    ):
        return None
    inner = conf.get("codecs", [])
    if len(inner) != 3 or inner[0]["name"] != "bytes" or inner[2]["name"] != "crc32c":
        return None
    if dtype.itemsize > 1 and inner[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    ndim = len(shape)
    return {"shape": shape, "shard_rows": shard_shape[0], "chunk_rows": chunk_shape[0],
            "dtype": dtype.newbyteorder("<"), "compressor": inner[1],
            "key": lambda s: meta.encode_chunk_key((s,) + (0,) * (ndim - 1))}


def _decompressor(conf: dict) -> Callable[[bytes], bytes] | None:
    name = conf["name"]
    if name == "zstd":
        from numcodecs import Zstd

        z = Zstd()
        return lambda b: z.decode(b)
    if name == "blosc":
        from numcodecs import Blosc

        bl = Blosc()
        return lambda b: bl.decode(b)
    return None


@dataclass
class ShardEncoder:
    """Encodes and writes whole shards of one row-chunked, sharded Zarr v3 array."""

    directory: Location
    shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    dtype: np.dtype
    compress: Callable[[np.ndarray], bytes]
    key: Callable[[int], str]

    @classmethod
    def for_array(cls, arr, directory: str | Path | Location) -> ShardEncoder | None:
        """An encoder for ``arr`` (a zarr.Array whose files are in ``directory``, a local folder or a
        store URL), or None if its layout is not the row-chunked ``bytes -> compressor -> crc32c``
        chain with the index at the end."""
        layout = row_sharded_layout(arr)
        compress = _compressor(layout["compressor"], layout["dtype"]) if layout else None
        if compress is None:
            return None
        return cls(directory=Location(directory), shape=layout["shape"], shard_rows=layout["shard_rows"],
                   chunk_rows=layout["chunk_rows"], dtype=layout["dtype"], compress=compress, key=layout["key"])

    def encode(self, s: int, block: np.ndarray) -> bytes:
        """The bytes of shard ``s`` holding ``block`` (the shard's rows; the last shard may be short)."""
        return b"".join(self._parts(s, block))

    def _parts(self, s: int, block: np.ndarray) -> list[bytes]:
        """The shard's bytes as consecutive pieces (written with one writev, never joined)."""
        a = s * self.shard_rows
        n = min(self.shape[0], a + self.shard_rows) - a
        if block.shape != (n, *self.shape[1:]):
            raise ValueError(f"shard {s}: block of shape {block.shape}, expected {(n, *self.shape[1:])}")
        block = np.ascontiguousarray(block, dtype=self.dtype)
        c = self.chunk_rows
        k = self.shard_rows // c
        index = np.full((k, 2), EMPTY, dtype="<u8")
        parts, offset = [], 0
        for i in range(k):
            lo = i * c
            if lo >= n:  # inner chunk past the end of the array: absent
                continue
            chunk = block[lo : lo + c]
            if chunk.shape[0] < c:  # the edge chunk is stored whole, padded with the fill value
                pad = np.zeros((c, *chunk.shape[1:]), dtype=self.dtype)
                pad[: chunk.shape[0]] = chunk
                chunk = pad
            enc = self.compress(chunk)
            parts += [enc, _crc(enc)]
            index[i] = (offset, len(enc) + 4)
            offset += len(enc) + 4
        ib = index.tobytes()
        parts += [ib, _crc(ib)]
        return parts

    def write(self, s: int, block: np.ndarray) -> tuple[Location, int]:
        """Encode shard ``s`` and put it in place whole and durably (a local directory's fsync is
        left to the caller); returns where and its size in bytes."""
        where = self.directory / self.key(s)
        return where, where.write_bytes(self._parts(s, block), sync_dir=False)


class ShardCorrupt(ValueError):
    """A shard file whose index or chunk fails its crc32c or points outside the file."""

    def __init__(self, path, shard: int, why: str):
        super().__init__(f"{path}: shard {shard} is corrupt ({why})")
        self.path, self.shard, self.why = path, shard, why


@dataclass
class ShardDecoder:
    """Reads rows of one row-chunked, sharded Zarr v3 array straight from its shard files: per
    shard one read of the index and one of the span of inner chunks the rows need, every chunk's
    and the index's crc32c checked, then numcodecs' decompression (the mirror of
    :class:`ShardEncoder`, without zarr's per-call machinery).  Given the recorded size of each
    shard file, it keeps the indexes it read (one read per shard, not per read)."""

    directory: Location
    shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    dtype: np.dtype
    decompress: Callable[[bytes], bytes]
    key: Callable[[int], str]
    sizes: np.ndarray | None = None  # the size extract recorded of each shard file (None: ask the file)
    index_budget: int = INDEX_BUDGET
    _indexes: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def for_array(cls, arr, directory: str | Path | Location, sizes: np.ndarray | None = None
                  ) -> ShardDecoder | None:
        """A decoder for ``arr`` (a zarr.Array whose files are in ``directory``, a local folder or a
        store URL), or None for any other layout (read it through zarr).  ``sizes``: the recorded
        size of each shard file, where its index is read (required on a store)."""
        layout = row_sharded_layout(arr)
        decompress = _decompressor(layout["compressor"]) if layout else None
        if decompress is None:
            return None
        return cls(directory=Location(directory), shape=layout["shape"], shard_rows=layout["shard_rows"],
                   chunk_rows=layout["chunk_rows"], dtype=layout["dtype"], decompress=decompress,
                   key=layout["key"], sizes=sizes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop); a damaged shard raises :class:`ShardCorrupt` naming it."""
        stop = min(stop, self.shape[0])
        out = np.zeros((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        r = self.shard_rows
        for s in range(start // r, (max(start, stop - 1)) // r + 1) if stop > start else ():
            a, b = max(start, s * r), min(stop, (s + 1) * r)
            self._read_shard(s, a - s * r, b - s * r, out[a - start : b - start])
        return out

    def _index(self, s: int) -> tuple[Location, np.ndarray, int]:
        """Shard ``s``'s file, its chunk index (crc32c checked) and the offset where the index
        starts.  With recorded ``sizes`` (a cache's reader, which checked the file once) the index is
        kept for later reads, within ``index_budget`` bytes; without, it is read every time."""
        k = self.shard_rows // self.chunk_rows
        index_bytes = 16 * k + 4
        where = self.directory / self.key(s)
        if s in self._indexes:
            self._indexes.move_to_end(s)
            return where, *self._indexes[s]
        size = int(self.sizes[s]) if self.sizes is not None else where.size()
        if size is None:
            raise FileNotFoundError(str(where))
        if size < index_bytes:
            raise ShardCorrupt(where, s, f"{size} bytes, shorter than its index")
        raw = where.read_range(size - index_bytes, size)
        if len(raw) != index_bytes:
            raise ShardCorrupt(where, s, f"shorter than the {size} bytes extract wrote")
        if _crc(raw[:-4]) != raw[-4:]:
            raise ShardCorrupt(where, s, "index checksum mismatch")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(k, 2)
        if self.sizes is None:
            return where, index, size - index_bytes
        self._indexes[s] = (index, size - index_bytes)
        while len(self._indexes) * index_bytes > self.index_budget and len(self._indexes) > 1:
            self._indexes.popitem(last=False)
        return where, index, size - index_bytes

    def _read_shard(self, s: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of shard ``s`` (shard-relative) into ``out``: the index (once), then one
        read of the span of inner chunks the rows need."""
        c = self.chunk_rows
        where, index, data_end = self._index(s)
        chunks = range(lo // c, (hi - 1) // c + 1)
        present = [i for i in chunks if index[i, 0] != EMPTY]
        if not present:
            return
        first = min(int(index[i, 0]) for i in present)
        last = max(int(index[i, 0] + index[i, 1]) for i in present)
        if last > data_end or any(int(index[i, 1]) < 4 for i in present):
            raise ShardCorrupt(where, s, "its index points outside the file")
        span = where.read_range(first, last)
        if len(span) != last - first:
            raise ShardCorrupt(where, s, f"shorter than its index says ({first + len(span)} of {last} bytes)")
        for i in present:
            off, n = int(index[i, 0]) - first, int(index[i, 1])
            enc, crc = span[off : off + n - 4], span[off + n - 4 : off + n]
            if _crc(enc) != crc:
                raise ShardCorrupt(where, s, f"chunk {i} checksum mismatch")
            chunk = np.frombuffer(self.decompress(enc), dtype=self.dtype).reshape(c, *self.shape[1:])
            a, b = max(lo, i * c), min(hi, (i + 1) * c)
            out[a - lo : b - lo] = chunk[a - i * c : b - i * c]
