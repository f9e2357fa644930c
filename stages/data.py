"""Reading images by their indexed location, and the one function that builds a view.

:func:`build_view` turns an image and explicit view
parameters (a crop box as fractions of the image, a flip) into a normalized tensor: the extract
stage and the distill loader call the same function, which is what makes cached targets valid.
"""

from __future__ import annotations

import io
import zlib

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipelineError

from .shards import Sample


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


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator for one (sample, view): depends on the key, not the sample's position."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), view])


def sample_view_params(rng: np.random.Generator, scale, ratio, hflip: float) -> dict:
    """Random-resized-crop parameters as fractions of the image (size-independent), plus a flip.

    The crop has area fraction ``s ~ U(scale)`` and aspect ``r`` log-uniform in ``ratio``; its
    sides as fractions are ``w = sqrt(s * r)``, ``h = sqrt(s / r)`` (for a square image; for other
    shapes the box is applied to each side's length, which keeps the area fraction).
    """
    for _ in range(10):
        s = rng.uniform(scale[0], scale[1])
        r = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w, h = float(np.sqrt(s * r)), float(np.sqrt(s / r))
        if w <= 1.0 and h <= 1.0:
            top = float(rng.uniform(0, 1 - h))
            left = float(rng.uniform(0, 1 - w))
            break
    else:
        side = float(np.sqrt(scale[1]))
        h = w = min(side, 1.0)
        top, left = (1 - h) / 2, (1 - w) / 2
    flip = bool(rng.uniform() < hflip)
    return {"crop_top": top, "crop_left": left, "crop_height": h, "crop_width": w, "flip": flip}


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
    """Map-style dataset over rows: each row is (Sample, view params); returns (pixels, label, ok, index).

    Pixels are uint8 (3, size, size), a quarter of the bytes of float across worker processes;
    consumers normalize whole batches with :meth:`normalize` (on the GPU when there is one).
    A sample whose image cannot be read or decoded returns zero pixels and ``ok = False`` (the
    caller records or fails on it), so one bad image never kills a worker.
    """

    def __init__(self, rows: list[tuple[Sample, dict]], size: int, mean, std, cache_mb: float = 0):
        self.rows = rows
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.reader = ImageReader()
        # decoded images kept for the views, epochs and splits that come back to them, up to cache_mb
        # per process; once it is full, later images are decoded every time (no eviction churn)
        self._images: dict[tuple[str, int], Image.Image] = {}
        self._cache_left = int(cache_mb * 2**20)

    @classmethod
    def for_config(cls, rows: list[tuple[Sample, dict]], data) -> ViewDataset:
        """The dataset of ``rows`` under a ``data:`` config section (size, normalization, decoded cache)."""
        return cls(rows, data.image_size, data.mean, data.std, cache_mb=data.decoded_cache_mb)

    def image(self, s: Sample) -> Image.Image:
        """The decoded RGB image of sample ``s`` (from the decoded-image cache when it is there)."""
        k = (s.url, s.offset)
        img = self._images.get(k)
        if img is None:
            img = decode_image(self.reader.read(s.url, s.offset, s.size))
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
            s = self.rows[i][0]
            raise PipelineError(
                f"{s.url}: the image of sample {s.key} (row {i}) was read at extract time and cannot be read now "
                f"({len(lost)} such rows in this batch); the source shards changed or are gone, rerun prepare "
                f"and extract"
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def __getitem__(self, i: int):
        x, y, ok, _ = self.batch([i])
        return x[0], int(y[0]), bool(ok[0]), i

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``indices`` as one batch: (uint8 pixels (B, 3, size, size), labels, ok, indices).

        Each view is written straight into the batch array: no per-row tensors, no collation.
        """
        n = len(indices)
        x = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        y = np.empty(n, dtype=np.int64)
        ok = np.ones(n, dtype=bool)
        for j, i in enumerate(indices):
            s, params = self.rows[i]
            y[j] = s.label
            try:
                x[j] = view_array(self.image(s), params, self.size)
            except Exception:  # noqa: BLE001 - any decode failure marks the row bad
                ok[j] = False
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        return pixels, torch.from_numpy(y), torch.from_numpy(ok), torch.as_tensor(list(indices), dtype=torch.int64)


class BatchViews(torch.utils.data.Dataset):
    """A :class:`ViewDataset` indexed by lists of rows, for ``DataLoader(batch_size=None, sampler=...)``
    with a sampler that yields batches of row indices."""

    def __init__(self, views: ViewDataset):
        self.views = views

    def __getitem__(self, indices):
        return self.views.batch(indices)
