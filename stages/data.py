"""Reading images by their indexed location, and the one function that builds a view.

:func:`build_view` turns an image and explicit view
parameters (a crop box as fractions of the image, a flip) into a normalized tensor: the extract
stage and the distill loader call the same function, which is what makes cached targets valid.

Rows are columns (:class:`cache.rows.Rows`: a :class:`cache.rows.Samples` table, a sample index per row
and one numpy column per view parameter); view parameters are drawn for whole columns at once by
:func:`sample_views` from counter-based random numbers keyed by (seed, sample key, stream), so a
sample's views never depend on where the shards list it.
"""

from __future__ import annotations

import copy
import io
import zlib

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipelineError

from cache.rows import Rows, Samples  # noqa: F401  (the row table)


class ImageReader:
    """Reads image bytes by (url, offset, size), keeping a few shard files open per process."""

    def __init__(self, max_open: int = 16):
        self._files: dict[str, object] = {}
        self.max_open = max_open

    def read(self, url: str, offset: int, size: int) -> bytes:
        f = self._files.get(url)
        if f is None:
            if len(self._files) >= self.max_open:
                _, old = self._files.popitem()
                old.close()
            f = fsspec.open(url, "rb").open()
            self._files[url] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        return {"max_open": self.max_open, "_files": {}}


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


# ----------------------------------------------------------------------------- views

VIEW_FIELDS = ("crop_top", "crop_left", "crop_height", "crop_width", "flip")
PLAIN_VIEW = {"crop_top": 0.0, "crop_left": 0.0, "crop_height": 1.0, "crop_width": 1.0, "flip": False}


# Streams of random numbers: extract's view v uses stream v; the row layouts (ORDER_STREAM + v for
# view v, ORDER_STREAM - 1 for val, ORDER_STREAM - 2 for the teacher fit's sample order), a
# student's per-class subset (SUBSET_STREAM), the teacher fit's epochs (FIT_STREAM + epoch) and a
# student's fresh views (FRESH_STREAM + epoch) use streams of their own, far from any view count.
ORDER_STREAM = 1 << 40
FIT_STREAM = 1 << 41
FRESH_STREAM = 1 << 42
SUBSET_STREAM = ORDER_STREAM - 3
_ATTEMPTS = 10  # random-resized-crop tries before the centred fallback (as torchvision)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays: a bijection whose outputs look independent."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def random_bits(key_hash: np.ndarray, seed: int, stream: int, draw: int) -> np.ndarray:
    """64 random bits per sample for draw ``draw`` of ``stream``: a pure function of (seed, key,
    stream, draw), the same in every process and whatever the order of the samples."""
    base = _splitmix(np.array([(seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + draw) % 2**64],
                              dtype=np.uint64))
    return _splitmix(np.asarray(key_hash, dtype=np.uint64) ^ base)


def uniform(key_hash: np.ndarray, seed: int, stream: int, draw: int) -> np.ndarray:
    """U[0, 1) float64 per sample from the top 53 bits of :func:`random_bits`."""
    return (random_bits(key_hash, seed, stream, draw) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_views(key_hash: np.ndarray, seed: int, stream: int, scale, ratio, hflip: float) -> dict[str, np.ndarray]:
    """Random-resized-crop parameters as fractions of the image (size-independent), plus a flip,
    for every sample at once (one column per field of :data:`VIEW_FIELDS`).

    The crop has area fraction ``s ~ U(scale)`` and aspect ``r`` log-uniform in ``ratio``; its
    sides as fractions are ``w = sqrt(s * r)``, ``h = sqrt(s / r)`` (for a square image; for other
    shapes the box is applied to each side's length, which keeps the area fraction).  Up to 10
    tries; a sample that never fits gets the centred square of side ``sqrt(scale[1])``.
    """
    h64 = np.asarray(key_hash, dtype=np.uint64)
    n = len(h64)
    side = min(float(np.sqrt(scale[1])), 1.0)
    out = {"crop_top": np.full(n, (1 - side) / 2), "crop_left": np.full(n, (1 - side) / 2),
           "crop_height": np.full(n, side), "crop_width": np.full(n, side)}
    todo = np.arange(n)
    for t in range(_ATTEMPTS):
        if not len(todo):
            break
        u = [uniform(h64[todo], seed, stream, 4 * t + k) for k in range(4)]
        s = scale[0] + (scale[1] - scale[0]) * u[0]
        r = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[1])
        w, h = np.sqrt(s * r), np.sqrt(s / r)
        fits = (w <= 1.0) & (h <= 1.0)
        hit = todo[fits]
        out["crop_height"][hit], out["crop_width"][hit] = h[fits], w[fits]
        out["crop_top"][hit] = u[2][fits] * (1 - h[fits])
        out["crop_left"][hit] = u[3][fits] * (1 - w[fits])
        todo = todo[~fits]
    out["flip"] = uniform(h64, seed, stream, 4 * _ATTEMPTS) < hflip
    return out


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


def plain_views(n: int) -> dict[str, np.ndarray]:
    """The whole image, unflipped, for ``n`` rows (val views)."""
    return {f: np.full(n, v, dtype=bool if f == "flip" else np.float64) for f, v in PLAIN_VIEW.items()}


def crop_box(params: dict, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (top, left, height, width) of the crop in an image of the given size."""
    top = int(round(params["crop_top"] * height))
    left = int(round(params["crop_left"] * width))
    h = max(1, int(round(params["crop_height"] * height)))
    w = max(1, int(round(params["crop_width"] * width)))
    h = min(h, height - top)
    w = min(w, width - left)
    return top, left, h, w


def view_array(img: Image.Image, params: dict, size: int) -> np.ndarray:
    """The view of ``img`` described by ``params`` as uint8 pixels (size, size, 3): crop, resize, flip.

    Pure and deterministic: the same image and parameters give the same pixels, bit for bit.
    """
    top, left, h, w = crop_box(params, img.width, img.height)
    if (top, left, h, w) != (0, 0, img.height, img.width) or img.size != (size, size):
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if params["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def view_pixels(img: Image.Image, params: dict, size: int) -> torch.Tensor:
    """:func:`view_array` as a (3, size, size) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(view_array(img, params, size).transpose(2, 0, 1)))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``, batched, on x's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


def build_view(img: Image.Image, params: dict, size: int, mean, std) -> torch.Tensor:
    """The normalized float view: :func:`normalize` of :func:`view_pixels`."""
    return normalize(view_pixels(img, params, size), mean, std)


class ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Rows`; returns (pixels, label, ok, index).

    Pixels are uint8 (3, size, size), a quarter of the bytes of float across worker processes;
    consumers normalize whole batches with :meth:`normalize` (on the GPU when there is one).
    A sample whose image cannot be read or decoded returns zero pixels and ``ok = False`` (the
    caller records or fails on it), so one bad image never kills a worker.
    """

    def __init__(self, rows: Rows, size: int, mean, std, cache_mb: float = 0):
        self.rows = rows
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.reader = ImageReader()
        # decoded images kept for the views, epochs and splits that come back to them, up to cache_mb
        # per process; once it is full, later images are decoded every time (no eviction churn)
        self._images: dict[tuple[str, int], Image.Image] = {}
        self._cache_left = int(cache_mb * 2**20)

    @classmethod
    def for_config(cls, rows: Rows, data) -> ViewDataset:
        """The dataset of ``rows`` under a ``data:`` config section (size, normalization, decoded cache)."""
        return cls(rows, data.image_size, data.mean, data.std, cache_mb=data.decoded_cache_mb)

    def image(self, j: int) -> Image.Image:
        """The decoded RGB image of sample ``j`` of the rows' table (from the decoded-image cache
        when it is there)."""
        s = self.rows.samples
        k = (int(s.url[j]), int(s.offset[j]))
        img = self._images.get(k)
        if img is None:
            data = self.reader.read(s.urls[k[0]], k[1], int(s.size[j]))
            if s.crc32[j] >= 0 and zlib.crc32(data) != s.crc32[j]:
                raise OSError(f"image bytes of {s.key[j]} changed since they were indexed (crc32 mismatch)")
            img = decode_image(data)
            nbytes = img.width * img.height * 3 + 1024  # pixels + the object's own overhead
            if nbytes <= self._cache_left:
                self._images[k] = img
                self._cache_left -= nbytes
        return img

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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

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
        """Rows ``indices`` as one batch: (uint8 pixels (B, 3, size, size), labels, ok, indices).

        Each view is written straight into the batch array: no per-row tensors, no collation.
        """
        idx = np.asarray(list(indices), dtype=np.int64)
        n = len(idx)
        x = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        y = self.rows.labels(idx).astype(np.int64)
        ok = np.ones(n, dtype=bool)
        sample = self.rows.sample[idx]
        for j, i in enumerate(idx):
            try:
                x[j] = view_array(self.image(int(sample[j])), self.rows.view_params(int(i)), self.size)
            except Exception:  # noqa: BLE001 - any decode failure marks the row bad
                ok[j] = False
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        return pixels, torch.from_numpy(y), torch.from_numpy(ok), torch.from_numpy(idx)


class BatchViews(torch.utils.data.Dataset):
    """A :class:`ViewDataset` indexed by lists of rows (what :func:`view_loader` loads)."""

    def __init__(self, views: ViewDataset):
        self.views = views

    def __getitem__(self, indices):
        return self.views.batch(indices)


def view_loader(ds: ViewDataset, batches, workers: int = 0, pin_memory: bool = False, prefetch: int = 2,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """The one loader of views: ``batches`` (any iterable of lists of row indices) sets the order:
    :func:`sequential_batches`, :func:`shuffled_batches`, shard by shard (extract), chunk-aligned
    units (distill).  Yields (uint8 pixels (B, 3, size, size), labels, ok, row indices), built in
    ``workers`` processes (0: in this one)."""
    return torch.utils.data.DataLoader(
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
