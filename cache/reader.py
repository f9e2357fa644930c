"""Reading the cache: refuse the wrong one loudly, serve rows in shard-aligned blocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from pipeline.errors import PipelineError
from pipeline.fingerprint import diff

from .layout import MANIFEST, CacheSpec, spec_from_attrs


@dataclass
class Block:
    """A contiguous row range of one (split, view)."""

    split: str
    view: int
    start: int
    stop: int


class Cache:
    """An opened, complete cache: arrays, manifest columns and the valid mask."""

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None, expect_inputs: dict | None = None):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except FileNotFoundError:
            raise PipelineError(f"{self.path}: no cache here; run extract") from None
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
        self.spec: CacheSpec = spec_from_attrs(self.attrs["spec"])
        try:
            self.manifest = pq.read_table(self.path / MANIFEST)
        except (OSError, ValueError) as e:
            raise PipelineError(f"{self.path / MANIFEST}: cannot read the manifest ({e})") from None
        self.blocks = [Block(**b) for b in self.attrs["blocks"]]
        self._valid: np.ndarray | None = None

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

    def array(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise PipelineError(f"{self.path}: no array {name!r} in the cache") from None

    @property
    def valid(self) -> np.ndarray:
        if self._valid is None:
            self._valid = self.read("valid", 0, self.spec.rows).astype(bool)
        return self._valid

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array; a checksum failure names the shard."""
        arr = self.array(name)
        try:
            return arr[start:stop]
        except ValueError as e:
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

    def views(self, split: str = "train") -> int:
        return sum(1 for b in self.blocks if b.split == split)

    def chunk_rows(self) -> int:
        """Rows per read unit: the smallest inner chunk among the arrays (reads stay chunk-aligned)."""
        return min(self.array(n).chunks[0] for n in self.spec.arrays())

    def column(self, name: str) -> np.ndarray:
        return self.manifest.column(name).to_numpy(zero_copy_only=False)
