"""Writing the cache: whole shards, durably, each recorded complete only once it is on disk.

zarr-python loses data when two writers touch one shard (zarr-python #3682, #3514), so a writer
is given whole shards and writes each shard file in one pass (:mod:`cache.shardfile`).  After the
shard files are fsynced, a marker ``_complete/<s>.json`` (with each file's size) is written
atomically; a shard without its marker, or whose files are no longer the sizes it records, is
rewritten on resume, a shard with a sound one is never touched again.
:meth:`CacheWriter.finalize` checks every marked file against its recorded size, writes the shard
index and records the digests readers check (:mod:`cache.reader`).

The cache may live on an object store (``extract.location``: a :class:`pipeline.storage.Location`
URL).  There is no rename there: each shard object is written whole by one PUT, by the one rank
that owns the shard, and the markers, then the shard index and the ``complete`` attribute, are
written after the objects they vouch for: they are the commit, and readers trust nothing else.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.errors import PipelineError
from pipeline.fsutil import WriteError, describe_os_error, fsync_dir
from pipeline.storage import Location

from .layout import (COMPLETE_DIR, FORMAT_VERSION, MANIFEST, SHARD_INDEX, CacheSpec, marker_name, meaning_digest,
                     open_group, shard_key, spec_to_attrs)
from .shardfile import ShardEncoder


def completed_shards(where: str | Path | Location) -> set[int]:
    """The shards of the cache at ``where`` that have their completion marker (one listing)."""
    return {int(name[:-5]) for name in (Location(where) / COMPLETE_DIR).listing()
            if name.endswith(".json") and name[:-5].isdigit()}


def _disk_error(path, e: OSError, what: str) -> PipelineError:
    where = e.filename if isinstance(e, WriteError) else path  # the file itself, when known
    return PipelineError(f"{where}: cannot write {what} ({describe_os_error(e)}); "
                         f"completed shards are kept, rerun to resume")


class CacheWriter:
    def __init__(self, path: str | Path | Location, spec: CacheSpec):
        self.store = Location(path)
        self.path = self.store if self.store.remote else self.store.local  # for messages (and local callers)
        self.spec = spec
        self.group = None
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads the array's metadata
        self._encoders: dict[str, ShardEncoder | None] = {}

    # ---------------------------------------------------------------- create / resume
    def create_or_resume(self, attrs: dict, manifest: pa.Table, fresh: bool = False) -> bool:
        """Create the group and arrays, or reopen one with the same fingerprint.  True if resumed.

        ``fresh`` starts over even when a cache with the same fingerprint is there (--force).
        """
        store = self.store
        try:
            if (store / "zarr.json").exists() and not fresh:
                g = open_group(store, mode="r+")
                if g.attrs.get("fingerprint") == attrs["fingerprint"]:
                    self.group = g
                    if not store.remote:
                        for tmp in store.local.rglob(".*.tmp"):  # a shard write cut short by a crash
                            tmp.unlink(missing_ok=True)
                    return True
                # another fingerprint in this folder: never mix, start over
            (store / COMPLETE_DIR).remove_tree()  # markers of another cache's shards
            store.make_dirs()
            (store / SHARD_INDEX).remove()
            g = open_group(store, mode="w")
            manifest_bytes = _parquet_bytes(manifest)
            full = {
                **attrs,
                "format_version": FORMAT_VERSION,
                "spec": spec_to_attrs(self.spec),
                "num_shards": self.spec.num_shards,
                "complete": False,
                "created": _dt.datetime.now().isoformat(timespec="seconds"),
            }
            full["integrity"] = {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                                 "meaning_sha256": meaning_digest(full)}
            g.attrs.update(full)
            for name in self.spec.arrays():
                g.create_array(name, **self.spec.array_args(name))  # the reader checks the same arguments
            (store / MANIFEST).write_bytes([manifest_bytes])
            (store / COMPLETE_DIR).make_dirs()
            self.group = g
            return False
        except OSError as e:
            raise _disk_error(self.path, e, "the cache") from None

    def completed(self) -> set[int]:
        return completed_shards(self.store)

    def unmark_damaged(self) -> list[int]:
        """Unmark each complete shard whose marker cannot be read or one of whose files is not the
        size the marker records (deleted, emptied or truncated since): a resuming run writes it
        again instead of failing at :meth:`finalize`.  Returns those shards."""
        done = sorted(self.completed())
        if not done:
            return []
        markers = self.store.read_many([marker_name(s) for s in done])
        on_disk = self.store.files()  # one listing: every file's size
        damaged = []
        for s in done:
            try:
                files = json.loads(markers[marker_name(s)]).get("files", {})
            except (KeyError, ValueError, AttributeError):
                files = {}
            if any(on_disk.get(self._shard_key(name, s)) != files.get(name) for name in self.spec.arrays()):
                (self.store / marker_name(s)).remove()
                damaged.append(s)
        return damaged

    def _shard_key(self, name: str, s: int) -> str:
        return f"{name}/{shard_key(self._array(name), s)}"

    # ---------------------------------------------------------------- shards
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # zarr skips a chunk equal to the fill value unless the array was opened with this set (a
            # write-time setting is ignored); every shard file must exist, as its marker records it
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _shard_file(self, name: str, s: int) -> Location:
        return self.store / name / shard_key(self._array(name), s)

    def _encoder(self, name: str) -> ShardEncoder | None:
        if name not in self._encoders:
            self._encoders[name] = ShardEncoder.for_array(self._array(name), self.store / name)
        return self._encoders[name]

    def write_shard(self, s: int, data: dict[str, np.ndarray], bad: list[dict]) -> None:
        """Write shard ``s`` of every array (data[name] holds exactly the shard's rows), then mark it.

        Each array's shard file is encoded in one pass and put in place whole (:mod:`cache.shardfile`:
        renamed after an fsync locally, one PUT on a store); an array whose codecs that path does not
        know goes through zarr's own assignment (fsynced afterwards locally).  The marker is
        written last.
        """
        a, b = self.spec.shard_rows(s)
        try:
            dirs = set()
            sizes = {}
            for name in self.spec.arrays():
                block = data[name]
                if block.shape[0] != b - a:
                    raise ValueError(f"shard {s}: {name} has {block.shape[0]} rows, expected {b - a}")
                enc = self._encoder(name)
                if enc is not None:
                    f, sizes[name] = enc.write(s, block)
                else:
                    self._array(name)[a:b] = block
                    f = self._shard_file(name, s)
                    if not f.remote:
                        _fsync_file(f.local)
                    sizes[name] = f.size()
                if not f.remote:
                    dirs.add(f.local.parent)
            for d in dirs:
                fsync_dir(d)
            (self.store / marker_name(s)).write_json({"shard": s, "rows": [a, b], "bad": bad, "files": sizes})
        except OSError as e:
            raise _disk_error(self.path, e, f"shard {s}") from None

    def finalize(self, extra: dict) -> dict:
        """Mark the cache complete once every shard is and every shard file has the size its marker
        records; write the shard index.  Returns the collected bad rows."""
        done = self.completed()
        missing = sorted(set(range(self.spec.num_shards)) - done)
        if missing:
            raise PipelineError(f"{self.path}: shards {missing[:10]} are not complete; rerun extract")
        markers = self.store.read_many([marker_name(s) for s in sorted(done)])
        on_disk = self.store.files()  # one listing: every file's size
        bad, names, shards, sizes = [], [], [], []
        for s in sorted(done):
            marker = json.loads(markers[marker_name(s)])
            bad.extend(marker.get("bad", []))
            for name in self.spec.arrays():
                want = marker.get("files", {}).get(name)
                key = self._shard_key(name, s)
                got = on_disk.get(key)
                if want is None or got != want:
                    (self.store / marker_name(s)).remove()  # rewritten by the next run
                    raise PipelineError(f"{self.store / key}: shard {s} file is "
                                        f"{'missing' if got is None else f'{got} bytes'}, "
                                        f"extract wrote {want} bytes; rerun extract to rewrite it")
                names.append(name)
                shards.append(s)
                sizes.append(want)
        index = pa.table({"array": names, "shard": np.array(shards, dtype=np.int64),
                          "nbytes": np.array(sizes, dtype=np.int64)})
        index_bytes = _parquet_bytes(index)
        try:
            (self.store / SHARD_INDEX).write_bytes([index_bytes])
            integrity = {**self.group.attrs.get("integrity", {}),
                         "shard_index_sha256": hashlib.sha256(index_bytes).hexdigest()}
            self.group.attrs.update({**extra, "complete": True, "bad_rows": bad, "integrity": integrity})
        except OSError as e:
            raise _disk_error(self.path, e, "the cache attributes") from None
        return {"bad_rows": bad}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resumable_attrs(where: str | Path | Location, fingerprint: str) -> dict | None:
    """The root attributes of the cache at ``where`` when :meth:`CacheWriter.create_or_resume` would
    resume it (a cache with this fingerprint is there), else None: a resumed run encodes with the
    spec its finished shards were written with (calibrated quantization tables)."""
    store = Location(where)
    if not (store / "zarr.json").exists():
        return None
    try:
        attrs = dict(open_group(store, mode="r").attrs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return attrs if attrs.get("fingerprint") == fingerprint and "spec" in attrs else None


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
