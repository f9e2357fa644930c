"""A cache split as a ``torch.utils.data.Dataset``: the stored views and their teacher targets.

Each item is a row of the cache: its view rebuilt from the source image and the parameters the
manifest stores (erased and mixed as extract fed it to the teacher), its label target, and the
teacher targets asked for.  Rows come from the same code the pipeline's students read
(:class:`stages.data.ViewDataset`, :meth:`cache.reader.Cache.read_layer`), with every integrity
check of :class:`cache.reader.Cache`: a damaged shard is the same named error.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Literal

import numpy as np
import torch

from cache.reader import Cache
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from stages.data import ViewDataset, per_class_subset
from stages.spectral import pool_channels

LayerForm = Literal["spectra", "features"]


class CacheDataset(torch.utils.data.Dataset):
    """Rows of one split of a cache, indexed 0..len-1 over the rows extract could read.

    Args:
        cache: an opened cache (:func:`spectralkd.open_cache`).
        data: the ``data:`` section the cache was made with (the pipeline config's, as students use
            it); None: the one the cache records, checked against its fingerprint's inputs.
        split: 'train' or 'val'.
        logits: whether items carry the teacher's logits.
        layers: teacher layer indices whose targets items carry (as ``extract.layers`` counts them).
        form: 'spectra' (dense rfft2, (C, H, W//2+1, 2)) or 'features' ((C, H, W)), each the stored
            one or computed from the other (:meth:`cache.reader.Cache.read_layer`).
        widths: teacher layer -> the channel width its target is average-pooled to (a student's
            width), or one width for every layer; None keeps the stored width.
        views: K', the first K' of the cache's train views (epoch e reads view e mod K'); None: all.
        per_class: train on this many images per class (the seeded subset students use with
            ``train_per_class``), or None for all; ``seed`` is the config's seed.

    Items are dicts: ``x`` (3, size, size) float32, normalized, erased and mixed as the cache's
    views are; ``y`` the class index, or with mixing the (num_classes,) mixed label; ``row`` the
    cache row; ``targets`` {"logits": (K,), <layer>: its target} as float32 tensors.  Call
    :meth:`set_epoch` every epoch (DistributedSampler's convention) to move to the next view.
    """

    def __init__(self, cache: Cache, data: DataConfig | None = None, split: str = "train", logits: bool = True,
                 layers: Iterable[int] = (), form: LayerForm = "spectra", widths: dict[int, int] | int | None = None,
                 views: int | None = None, per_class: int | None = None, seed: int = 0):
        if form not in ("spectra", "features"):
            raise PipelineError(f"CacheDataset form: {form!r}; 'spectra' or 'features'")
        self.cache, self.split, self.logits, self.form = cache, split, logits, form
        self.layers = [cache.layer(t).index for t in layers]  # an uncached layer is named
        self.widths = {t: widths for t in self.layers} if isinstance(widths, int) else dict(widths or {})
        self.data = data if data is not None else recorded_data(cache)
        self.views = self._view_count(views)
        self.per_class, self.seed = per_class, seed
        self._units: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # decoded read units, per process
        self._dataset: ViewDataset | None = None
        self.set_epoch(0)

    # ------------------------------------------------------------ rows
    def _view_count(self, views: int | None) -> int:
        k = self.cache.view_count(self.split)
        if views is not None and not 1 <= views <= k:
            raise PipelineError(f"CacheDataset views: {views}, but {self.cache.path} holds {k} {self.split} views "
                                f"per image (extract.views)")
        return views or k

    def set_epoch(self, epoch: int) -> None:
        """Read view ``epoch mod K'`` from now on (val has one view)."""
        self.epoch = epoch
        b = self.cache.block(self.split, epoch % self.views)
        keep = self.cache.valid[b.start : b.stop]
        if self.per_class is not None:
            rows = self.dataset.rows
            b0 = self.cache.block(self.split, 0)
            subset = per_class_subset(rows.samples, rows.sample[b0.start : b0.stop], self.per_class, self.seed)
            keep = keep & subset[rows.sample[b.start : b.stop]]
        self.rows = b.start + np.flatnonzero(keep)

    @property
    def dataset(self) -> ViewDataset:
        """The view replay of the cache's rows (made in each process on first use)."""
        if self._dataset is None:
            self._dataset = ViewDataset.for_config(self.cache.rows(), self.data)
        return self._dataset

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------ items
    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        ds = self.dataset
        x, y, ok, _ = ds.batch([row])
        ds.require_readable([row], ok.numpy(), [True])
        rows = np.array([row])
        out = {"x": ds.normalize(x, rows)[0], "row": row,
               "y": ds.label_targets(y, rows, self.cache.spec.num_classes)[0], "targets": {}}
        if self.logits:
            out["targets"]["logits"] = torch.from_numpy(self._unit_row("logits", row).astype(np.float32))
        for t in self.layers:
            out["targets"][t] = self._layer_target(t, row)
        return out

    def _layer_target(self, t: int, row: int) -> torch.Tensor:
        v = torch.from_numpy(self._unit_row((self.form, t), row).astype(np.float32))
        w = self.widths.get(t)
        return pool_channels(v[None], w)[0] if w is not None and w != v.shape[0] else v

    def _unit_row(self, what, row: int) -> np.ndarray:
        """Row ``row`` of an array (``"logits"``, or (form, layer)), from its decoded read unit: a unit is
        read and checked once and kept while the next few are read (items of one unit come together
        under :meth:`unit_order`)."""
        unit = self.cache.chunk_rows()
        u = row // unit
        key = (str(what), u)
        block = self._units.get(key)
        if block is None:
            a, b = u * unit, min((u + 1) * unit, self.cache.spec.rows)
            block = self.cache.read("logits", a, b) if what == "logits" else self.cache.read_layer(*what, a, b)
            self._units[key] = block
            while len(self._units) > 4 * (1 + len(self.layers)):
                self._units.popitem(last=False)
        else:
            self._units.move_to_end(key)
        return block[row - u * unit]

    def unit_order(self, seed: int = 0, shuffle: bool = True) -> list[int]:
        """Item indices grouped by the cache's read units (units in a seeded order, rows shuffled
        within each): a sampler order that decodes each unit once per epoch."""
        unit = self.cache.chunk_rows()
        units = self.rows // unit
        starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
        groups = np.split(np.arange(len(self.rows)), starts[1:])
        rng = np.random.default_rng([seed, self.epoch])
        if shuffle:
            groups = [groups[j] for j in rng.permutation(len(groups))]
            groups = [rng.permutation(g) for g in groups]
        return np.concatenate(groups).tolist() if groups else []

    def __getstate__(self) -> dict:  # workers decode their own units
        state = dict(self.__dict__)
        state["_units"] = OrderedDict()
        return state


def recorded_data(cache: Cache) -> DataConfig:
    """The ``data:`` section a cache records, checked against the inputs its fingerprint hashes
    (every field that decides the views is among them)."""
    from pipeline.schema import decisive
    from pipeline.fingerprint import fingerprint

    try:
        data = DataConfig.model_validate(cache.attrs["config"]["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"{cache.path}/zarr.json: no readable data section in the cache's config ({e})") from None
    inputs = cache.attrs.get("inputs") or {}
    recorded = inputs.get("params", {}).get("data")
    if fingerprint(inputs) != cache.attrs.get("fingerprint") or recorded != decisive(data):
        raise PipelineError(f"{cache.path}/zarr.json: the cache's recorded data section does not match its "
                            f"fingerprint; open it through its pipeline config instead")
    return data
