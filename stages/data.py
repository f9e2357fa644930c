"""Reading images by their indexed location, and the one dataset and loader of views.

:class:`ViewDataset` builds each row's view from its image and its explicit view parameters with
:func:`stages.views.view_array`, and erases the normalized batch with :func:`stages.views.erase`:
the extract stage, the teacher fit, the distill loader and analyze all go through it, which is what
makes cached targets valid.

Rows are columns (:class:`cache.rows.Rows`: a :class:`cache.rows.Samples` table, a sample index per row
and one numpy column per view parameter); view parameters are drawn for whole columns at once by
:func:`stages.views.sample_views` from counter-based random numbers keyed by (seed, sample key,
stream), so a sample's views never depend on where the shards list it.

Every read of a sample checks its image and label bytes against the crc32s prepare recorded: a
sample whose bytes changed or cannot be read raises :class:`SourceChanged` (one line naming the tar
and the key, also from loader worker processes); only an image that still matches but does not
decode is a bad row (``ok = False``), which the caller records or fails on.
"""

from __future__ import annotations

import copy
import io
import zlib

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline import storage
from pipeline.errors import PipelineError

from cache.rows import Rows, Samples  # noqa: F401  (the row table)

from .pixels import erase, mix
from .views import ViewPolicy, random_bits, view_array


class SourceChanged(PipelineError):
    """A sample's bytes are not those prepare indexed (its image's or label's crc32 differs, the
    label says another class) or cannot be read: an error wherever it is read, never a bad row."""


class ImageReader:
    """Reads image bytes by (url, offset, size), keeping a few local shard files open per process.

    A shard on a store is read whole (one GET of the span its samples occupy) while that fits the
    process's ``object_mb`` budget, and the members of a shard past the budget with one ranged GET
    each, which also takes in the bytes just after (a sample's label member follows its image).
    Every member read is checked against the crc32 prepare recorded by the caller
    (:meth:`ViewDataset.checked_bytes`), from a kept copy as from the store."""

    LOOKAHEAD = 1536  # bytes read past a member on a store: the next member's tar header and a small label

    def __init__(self, max_open: int = 16, object_mb: float = 0):
        self._files: dict[str, object] = {}
        self.max_open = max_open
        self.object_mb = object_mb
        self._objects: dict[str, bytes] = {}  # store objects kept whole (up to the budget, never evicted)
        self._object_left = int(object_mb * 2**20)
        self._last: tuple[str, int, bytes] | None = None  # the last ranged read: url, start, bytes

    def read(self, url: str, offset: int, size: int, span: int | None = None) -> bytes:
        """``size`` bytes at ``offset`` of ``url``; ``span``: the bytes of the object its samples
        occupy (from the index), which may be read whole once."""
        if storage.is_url(url):
            data = self._read_object(url, offset, size, span)
        else:
            data = self._read_file(url, offset, size)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def _read_object(self, url: str, offset: int, size: int, span: int | None) -> bytes:
        whole = self._objects.get(url)
        if whole is None and span is not None and span <= self._object_left:
            whole = self._objects[url] = storage.read_range(url, 0, span)
            self._object_left -= span
        if whole is not None and offset + size <= len(whole):
            return whole[offset : offset + size]
        last = self._last
        if last is not None and last[0] == url and last[1] <= offset and offset + size <= last[1] + len(last[2]):
            return last[2][offset - last[1] : offset - last[1] + size]
        data = storage.read_range(url, offset, offset + size + self.LOOKAHEAD)
        self._last = (url, offset, data)
        return data[:size]

    def _read_file(self, url: str, offset: int, size: int) -> bytes:
        f = self._files.get(url)
        if f is None:
            if len(self._files) >= self.max_open:
                _, old = self._files.popitem()
                old.close()
            f = fsspec.open(url, "rb").open()
            self._files[url] = f
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # file handles and kept objects do not cross process boundaries
        return {"max_open": self.max_open, "object_mb": self.object_mb, "_files": {}, "_objects": {},
                "_object_left": int(self.object_mb * 2**20), "_last": None}


def decode_image(data: bytes) -> Image.Image:
    """RGB image of encoded bytes; 16- and 32-bit grey images are scaled to 8 bits (PIL's convert
    would clip them to near-white)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode.startswith("I"):
        a = np.asarray(img).astype(np.int64)
        bits = 16 if img.mode.startswith("I;16") or a.max(initial=0) < 65536 else 32
        a = np.clip(a, 0, 2**bits - 1) >> (bits - 8)
        img = Image.fromarray(a.astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


# ----------------------------------------------------------------------------- streams and sample sets

# Streams of random numbers: extract's view v uses stream v; the row layouts (ORDER_STREAM + v for
# view v, ORDER_STREAM - 1 for val, ORDER_STREAM - 2 for the teacher fit's sample order), a
# student's per-class subset (SUBSET_STREAM), the teacher fit's epochs (FIT_STREAM + epoch) and a
# student's fresh views (FRESH_STREAM + epoch) use streams of their own, far from any view count.
ORDER_STREAM = 1 << 40
FIT_STREAM = 1 << 41
FRESH_STREAM = 1 << 42
SUBSET_STREAM = ORDER_STREAM - 3


def layout_order(samples: Samples, seed: int, stream: int) -> np.ndarray:
    """A seeded permutation of ``samples`` that depends on their keys only (not their input order)."""
    return np.argsort(random_bits(samples.key_hashes(), seed, stream, 0), kind="stable")


def per_class_subset(samples: Samples, candidates: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A mask over ``samples``: ``per_class`` of the ``candidates`` (sample indices) of each label,
    chosen by a seeded order of their keys (the same subset whatever order the shards list them in)."""
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    bits = random_bits(samples.key_hashes()[candidates], seed, SUBSET_STREAM, 0)
    order = candidates[np.lexsort((bits, samples.label[candidates]))]  # by label, then seeded order
    labels = samples.label[order]
    first = np.searchsorted(labels, labels, side="left")  # where each label's run starts
    keep = np.zeros(len(samples), dtype=bool)
    keep[order[np.arange(len(order)) - first < per_class]] = True
    return keep


def view_pixels(img: Image.Image, params: dict, size: int, fill=(128, 128, 128)) -> torch.Tensor:
    """:func:`stages.views.view_array` as a (3, size, size) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(view_array(img, params, size, fill).transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``, batched, on x's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


def build_view(img: Image.Image, params: dict, size: int, mean, std) -> torch.Tensor:
    """The normalized float view of one image without erasing: :func:`normalize` of :func:`view_pixels`
    (RandAugment fills with the colour of ``mean``)."""
    return normalize(view_pixels(img, params, size, ViewPolicy(size=size, mean=tuple(mean)).fill), mean, std)


class ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Rows`; returns (pixels, label, ok, index).

    Pixels are uint8 (3, size, size), a quarter of the bytes of float across worker processes;
    consumers normalize whole batches with :meth:`normalize` (on the GPU when there is one), which
    also applies the rows' random erasing.
    A sample whose image bytes are the indexed ones but do not decode returns zero pixels and
    ``ok = False`` (the caller records or fails on it), so one bad image never kills a worker; one
    whose image or label bytes changed or cannot be read raises :class:`SourceChanged`.
    """

    def __init__(self, rows: Rows, size: int, mean, std, cache_mb: float = 0, policy: ViewPolicy | None = None,
                 object_mb: float = 0):
        self.rows = rows
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.policy = policy or ViewPolicy(size=size, mean=self.mean)
        self.fill = self.policy.fill
        self.reader = ImageReader(object_mb=object_mb)  # object_mb: input shards on a store kept whole
        self._spans: np.ndarray | None = None
        # decoded images kept for the views, epochs and splits that come back to them, up to cache_mb
        # per process; once it is full, later images are decoded every time (no eviction churn)
        self._images: dict[tuple[str, int], Image.Image] = {}
        self._cache_left = int(cache_mb * 2**20)

    @classmethod
    def for_config(cls, rows: Rows, data, norm=None) -> ViewDataset:
        """The dataset of ``rows`` under a ``data:`` config section (size, view policy, decoded cache),
        normalized as ``norm`` says (a :class:`stages.models.Normalization`; None: ``data.mean/std``)."""
        mean, std = (norm.mean, norm.std) if norm is not None else (data.mean, data.std)
        return cls(rows, data.image_size, mean, std, cache_mb=data.decoded_cache_mb, policy=ViewPolicy.of(data),
                   object_mb=data.object_cache_mb)

    def spans(self) -> np.ndarray:
        """Per shard url of the rows' samples, the bytes its indexed members occupy (from 0)."""
        if self._spans is None:
            s = self.rows.samples
            ends = np.zeros(len(s.urls), dtype=np.int64)
            np.maximum.at(ends, s.url, s.offset.astype(np.int64) + s.size)
            if s.cls_offset is not None:
                np.maximum.at(ends, s.url, np.where(s.cls_crc32 >= 0, s.cls_offset.astype(np.int64) + s.cls_size, 0))
            self._spans = ends
        return self._spans

    def image(self, j: int, row: int | None = None) -> Image.Image:
        """The decoded RGB image of sample ``j`` of the rows' table (from the decoded-image cache
        when it is there), its bytes and its label's checked (:meth:`checked_bytes`); ``row``: the
        row it is read for, for messages."""
        s = self.rows.samples
        k = (int(s.url[j]), int(s.offset[j]))
        img = self._images.get(k)
        if img is None:
            img = decode_image(self.checked_bytes(j, row))
            nbytes = img.width * img.height * 3 + 1024  # pixels + the object's own overhead
            if nbytes <= self._cache_left:
                self._images[k] = img
                self._cache_left -= nbytes
        return img

    def checked_bytes(self, j: int, row: int | None = None) -> bytes:
        """Sample ``j``'s image bytes, after checking them and its label member against the crc32s
        prepare recorded (where recorded) and the label against the indexed one; a difference or a
        failed read raises :class:`SourceChanged`."""
        s = self.rows.samples
        data = self._read_member(j, row, "image", int(s.offset[j]), int(s.size[j]), int(s.crc32[j]))
        if s.cls_crc32[j] >= 0:
            cls = self._read_member(j, row, "label", int(s.cls_offset[j]), int(s.cls_size[j]), int(s.cls_crc32[j]))
            if _label_value(cls) != int(s.label[j]):
                raise self._changed(j, row, "label", f"says {cls[:20]!r}, the index {int(s.label[j])}")
        return data

    def _read_member(self, j: int, row: int | None, what: str, offset: int, size: int, crc: int) -> bytes:
        s = self.rows.samples
        try:
            url = s.urls[s.url[j]]
            span = int(self.spans()[s.url[j]]) if storage.is_url(url) else None
            data = self.reader.read(url, offset, size, span)
        except (OSError, ValueError) as e:
            raise self._changed(j, row, what, f"cannot be read now ({e})") from None
        if crc >= 0 and zlib.crc32(data) != crc:
            raise self._changed(j, row, what, "changed since prepare indexed it (crc32 mismatch)")
        return data

    def _changed(self, j: int, row: int | None, what: str, how: str) -> SourceChanged:
        s = self.rows.samples
        where = f" (row {row})" if row is not None else ""
        read = " was read at extract time and" if self.rows.extracted else ""
        return SourceChanged(f"{s.urls[s.url[j]]}: the {what} of sample {s.key[j]}{where}{read} {how}; the source "
                             f"shards changed after prepare indexed them: restore them, or rerun prepare and the "
                             f"stages after it with --force")

    def __len__(self) -> int:
        return len(self.rows)

    def require_readable(self, indices, ok, recorded_valid) -> None:
        """Fail naming the file when a row whose image extract read (``recorded_valid``) cannot be
        read now: its targets were made from an image that is no longer there."""
        lost = np.flatnonzero(~np.asarray(ok, dtype=bool) & np.asarray(recorded_valid, dtype=bool))
        if len(lost):
            i = int(indices[lost[0]])
            s = self.rows.source(i)
            raise PipelineError(
                f"{s.url}: the image of sample {s.key} (row {i}) was read at extract time and cannot be read now "
                f"({len(lost)} such rows in this batch); the source shards changed or are gone, rerun prepare "
                f"and extract"
            )

    def normalize(self, x: torch.Tensor, rows) -> torch.Tensor:
        """uint8 views of ``rows`` (row indices, in batch order) -> normalized float views, with
        each row's random erasing applied, and with mixing (``x`` of (B, 2, 3, H, W): each row's view
        and its partner's, as :meth:`batch` gives them) each row mixed with its partner."""
        rows = np.asarray(rows, dtype=np.int64)
        if x.ndim == 5:
            p = self.rows.params
            partner = np.where(p["mix_partner"][rows] >= 0, p["mix_partner"][rows], rows)
            return mix(self._normalize_erased(x[:, 0], rows), self._normalize_erased(x[:, 1], partner),
                       p["mix_lam"][rows], p["mix_box"][rows])
        return self._normalize_erased(x, rows)

    def _normalize_erased(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        out = normalize(x, self.mean, self.std)
        if "erase_box" in self.rows.params:
            out = erase(out, self.rows.params["erase_box"][rows], self.rows.params["erase_seed"][rows],
                        self.policy.erase_mode)
        return out

    def label_targets(self, y: torch.Tensor, rows, num_classes: int) -> torch.Tensor:
        """A batch's training targets: its class indices, or with mixing the declared mix of each
        row's one-hot label and its partner's, (B, num_classes) float (cross-entropy's label
        smoothing then applies to the mix, as timm's ``mixup_target``)."""
        if "mix_partner" not in self.rows.params:
            return y
        rows = np.asarray(rows, dtype=np.int64)
        p = self.rows.params
        partner = np.where(p["mix_partner"][rows] >= 0, p["mix_partner"][rows], rows)
        lam = torch.from_numpy(p["mix_lam"][rows].astype(np.float32)).to(y.device).view(-1, 1)
        y2 = torch.from_numpy(self.rows.labels(partner).astype(np.int64)).to(y.device)
        one = torch.nn.functional.one_hot
        return lam * one(y, num_classes).float() + (1 - lam) * one(y2, num_classes).float()

    def normalized_as(self, norm) -> ViewDataset:
        """This dataset normalizing with ``norm``'s mean and std (another model's input), sharing
        file handles and decoded images with this one."""
        other = copy.copy(self)
        other.mean, other.std = tuple(norm.mean), tuple(norm.std)
        return other

    def with_rows(self, rows: Rows) -> ViewDataset:
        """This dataset over other rows of the same samples (fresh views): file handles and decoded
        images are shared with this one."""
        other = copy.copy(self)
        other.rows = rows
        return other

    def __getitem__(self, i: int):
        x, y, ok, _ = self.batch([i])
        return x[0], int(y[0]), bool(ok[0]), i

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``indices`` as one batch: (uint8 pixels (B, 3, size, size), or (B, 2, 3, size, size)
        with mixing: each row's view and its partner's; labels, ok, indices).

        Each view is written straight into the batch array: no per-row tensors, no collation.
        """
        idx = np.asarray(list(indices), dtype=np.int64)
        y = self.rows.labels(idx).astype(np.int64)
        x, ok = self._views(idx)
        if "mix_partner" in self.rows.params:  # each row's view and its partner's, mixed by normalize
            partner = self.rows.params["mix_partner"][idx]
            has = partner >= 0
            xp, okp = x.copy(), ok.copy()
            if has.any():
                xp[has], okp[has] = self._views(partner[has])
            x, ok = np.stack([x, xp], axis=1), ok & okp
        pixels = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))
        return pixels, torch.from_numpy(y), torch.from_numpy(ok), torch.from_numpy(idx)

    def _views(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) views of rows ``idx`` and whether each could be built (a changed
        or unreadable sample raises :class:`SourceChanged`)."""
        x = np.zeros((len(idx), self.size, self.size, 3), dtype=np.uint8)
        ok = np.ones(len(idx), dtype=bool)
        sample = self.rows.sample[idx]
        for j, i in enumerate(idx):
            try:
                x[j] = view_array(self.image(int(sample[j]), int(i)), self.rows.view_params(int(i)), self.size,
                                  self.fill)
            except SourceChanged:
                raise
            except Exception:  # noqa: BLE001 - any decode failure of the indexed bytes marks the row bad
                ok[j] = False
        return x, ok


def _label_value(data: bytes) -> int | None:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


class BatchViews(torch.utils.data.Dataset):
    """A :class:`ViewDataset` indexed by lists of rows (what :func:`view_loader` loads)."""

    def __init__(self, views: ViewDataset):
        self.views = views

    def __getitem__(self, indices):
        try:
            return self.views.batch(indices)
        except SourceChanged as e:  # handed to the iterating process as it is (see ViewLoader)
            return e


class ViewLoader(torch.utils.data.DataLoader):
    """A DataLoader of :class:`BatchViews`: a batch that met a changed sample is raised where the
    batches are iterated as the worker's one-line :class:`SourceChanged` (torch would re-raise a
    worker's exception wrapped in its traceback)."""

    def __iter__(self):
        for item in super().__iter__():
            if isinstance(item, SourceChanged):
                raise item
            yield item


def view_loader(ds: ViewDataset, batches, workers: int = 0, pin_memory: bool = False, prefetch: int = 2,
                generator: torch.Generator | None = None) -> ViewLoader:
    """The one loader of views: ``batches`` (any iterable of lists of row indices) sets the order:
    :func:`sequential_batches`, :func:`shuffled_batches`, shard by shard (extract), chunk-aligned
    units (distill).  Yields (uint8 pixels (B, 3, size, size), labels, ok, row indices), built in
    ``workers`` processes (0: in this one); a changed sample raises :class:`SourceChanged`."""
    return ViewLoader(
        BatchViews(ds), sampler=batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False, generator=generator,
    )


def sequential_batches(rows: range, batch_size: int) -> list[list[int]]:
    """``rows`` in order, ``batch_size`` at a time."""
    return [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> torch.utils.data.BatchSampler:
    """Rows 0..n-1 in a random order drawn from ``generator`` when iterated, ``batch_size`` at a time."""
    order = torch.utils.data.RandomSampler(range(n), generator=generator)
    return torch.utils.data.BatchSampler(order, batch_size, drop_last=False)
