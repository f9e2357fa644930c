"""View parameters: drawn as columns, replayed as pixels.

A view is described by explicit parameters, never by a seed whose meaning depends on library
internals: a crop box as fractions of the image and its interpolation, a flip, the RandAugment ops
with their signed magnitudes and whether each was applied, the color-jitter factors and their order,
the random-erasing boxes with the seed of their noise, and the mixing partner (a row), lambda and
cutmix box (or, for eval views, the crop_pct of timm's resize-and-center-crop).  The policy is
timm's ImageNet transforms (``timm.data.create_transform``) and its Mixup: random-resized crop,
flip, RandAugment or color jitter, random erasing on the normalized tensor, then mixup or cutmix
with the partner's view; eval resizes the shorter side to ``size / crop_pct`` and crops the centre.

- :func:`sample_views` draws every parameter for whole columns at once from counter-based random
  numbers keyed by (seed, sample key, stream, draw), so a sample's views never depend on where the
  shards list it nor on any library's random state;
- :func:`view_array` builds a view's uint8 pixels from an image and its parameters (PIL),
  :func:`erase` applies the erasing boxes to the normalized batch and :func:`mix` mixes each row
  with its partner: together, the one replay (:meth:`stages.data.ViewDataset.normalize` runs the
  last two).

Which columns a view has depends on the policy (:meth:`ViewPolicy.fields`); every row of one table
has the same columns.  Columns with a second axis (``ra_*``, ``cj_*``, ``erase_box``, ``mix_box``)
are stored as fixed-size lists in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import RAND_AUGMENT_LEVELS, rand_augment_options

from .pixels import color_jitter_op, rand_augment_op

# ----------------------------------------------------------------------------- random numbers


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


def gaussian(key_hash: np.ndarray, seed: int, stream: int, draw: int) -> np.ndarray:
    """N(0, 1) float64 per sample (Box-Muller of draws ``draw`` and ``draw + 1``)."""
    u1, u2 = uniform(key_hash, seed, stream, draw), uniform(key_hash, seed, stream, draw + 1)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


# Draw numbers within a view's stream: the crop uses 0 .. 4 * _ATTEMPTS - 1 and the flip
# 4 * _ATTEMPTS (their values are those of every cache built before the other parts existed).
_ATTEMPTS = 10  # random-resized-crop and erasing tries before giving up (as torchvision and timm)
_INTERP_DRAW = 4 * _ATTEMPTS + 1
_RA_DRAW, _RA_STRIDE = 1000, 8  # + 8 * layer + {0 op, 1 applied, 2-3 gaussian, 4 sign}
_CJ_DRAW = 2000  # + {0-3 factors, 4-7 order}
_ERASE_DRAW = 3000  # + {0 applied, 1 count, 2 seed} then 4 per (box, attempt)
_MIX_DRAW = 5000  # + {0 partner, 1 cutmix or mixup, 2 lambda, 3 applied, 4-5 box centre}


# ----------------------------------------------------------------------------- the policy

INTERPOLATIONS = ("bilinear", "bicubic")  # the code stored in column `interp`
_PIL_INTERP = (Image.BILINEAR, Image.BICUBIC)

# timm's RandAugment op sets (timm.data.auto_augment: _RAND_TRANSFORMS and, with `inc1`,
# _RAND_INCREASING_TRANSFORMS); column `ra_op` stores an index into RA_OPS
_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RA_OPS = tuple(dict.fromkeys(_RAND_OPS + _RAND_INCREASING_OPS))
# ops whose magnitude gets a random sign (timm's _randomly_negate)
_SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
                         "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"})


@dataclass(frozen=True)
class RandAugment:
    """A parsed ``rand-`` string of timm (``rand-m9-mstd0.5-inc1``): the op set, the magnitude and its
    noise, layers per image and the probability each layer applies."""

    ops: tuple[str, ...]
    magnitude: float = 10.0
    layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = RAND_AUGMENT_LEVELS

    @classmethod
    def parse(cls, text: str) -> RandAugment:
        """timm's ``rand-`` string (grammar: :func:`pipeline.config.rand_augment_options`) with its op
        set: the increasing one with ``inc1``."""
        options = rand_augment_options(text)
        increasing = options.pop("increasing")
        return cls(ops=_RAND_INCREASING_OPS if increasing else _RAND_OPS, **options)


@dataclass(frozen=True)
class ViewPolicy:
    """How views are drawn and replayed (the ``data.augment`` and ``data.eval`` config sections, as
    timm's ``create_transform`` reads its arguments)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.0
    interpolation: str = "bilinear"  # or bicubic, or random (one of the two per view)
    rand_augment: RandAugment | None = None
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    erase_prob: float = 0.0
    erase_mode: str = "const"
    erase_count: int = 1
    mixup: float = 0.0  # Beta(alpha, alpha) of timm's Mixup; 0: off
    cutmix: float = 0.0
    mix_prob: float = 1.0  # probability a row is mixed at all
    mix_switch_prob: float = 0.5  # with both on: probability of cutmix
    crop_pct: float | None = None  # eval views: resize to size / crop_pct, center crop; None: whole image
    eval_interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # RandAugment's fill colour is round(255 * mean)

    @classmethod
    def of(cls, data) -> ViewPolicy:
        """The policy of a ``data:`` config section."""
        a = data.augment
        jitter = tuple(a.color_jitter) if isinstance(a.color_jitter, (list, tuple)) else (a.color_jitter,) * 3
        jitter = (jitter + (0.0,))[:4]
        return cls(size=data.image_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                   interpolation=a.interpolation,
                   rand_augment=RandAugment.parse(a.auto_augment) if a.auto_augment else None,
                   color_jitter=jitter if any(jitter) else None,
                   erase_prob=a.re_prob, erase_mode=a.re_mode, erase_count=a.re_count,
                   mixup=a.mixup, cutmix=a.cutmix, mix_prob=a.mixup_prob, mix_switch_prob=a.mixup_switch_prob,
                   crop_pct=data.eval.crop_pct, eval_interpolation=data.eval.interpolation, mean=tuple(data.mean))

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    @property
    def fill(self) -> tuple[int, int, int]:
        return tuple(min(255, round(255 * m)) for m in self.mean)

    def fields(self) -> tuple[str, ...]:
        """The view columns of this policy, in order."""
        out = ["crop_top", "crop_left", "crop_height", "crop_width", "flip", "interp"]
        if self.rand_augment:
            out += ["ra_op", "ra_applied", "ra_level"]
        if self.color_jitter:
            out += ["cj_factor", "cj_order"]
        if self.erase_prob > 0:
            out += ["erase_box", "erase_seed"]
        if self.mixes:
            out += ["mix_partner", "mix_lam", "mix_box"]
        if self.crop_pct:
            out += ["crop_pct"]
        return tuple(out)


# ----------------------------------------------------------------------------- drawing parameters


def neutral_views(n: int, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """``n`` rows of the whole image, unflipped and unaugmented, with every column of ``policy``."""
    out = {"crop_top": np.zeros(n), "crop_left": np.zeros(n), "crop_height": np.ones(n), "crop_width": np.ones(n),
           "flip": np.zeros(n, dtype=bool),
           "interp": np.full(n, INTERPOLATIONS.index(_fixed_interp(policy.eval_interpolation)), dtype=np.uint8)}
    if policy.rand_augment:
        layers = policy.rand_augment.layers
        out["ra_op"] = np.zeros((n, layers), dtype=np.int8)
        out["ra_applied"] = np.zeros((n, layers), dtype=bool)
        out["ra_level"] = np.zeros((n, layers), dtype=np.float32)
    if policy.color_jitter:
        out["cj_factor"] = np.full((n, 4), np.nan, dtype=np.float32)  # nothing applied (hue 0 is not a no-op)
        out["cj_order"] = np.tile(np.arange(4, dtype=np.int8), (n, 1))
    if policy.erase_prob > 0:
        out["erase_box"] = np.zeros((n, 4 * policy.erase_count), dtype=np.int16)
        out["erase_seed"] = np.zeros(n, dtype=np.uint32)
    if policy.mixes:
        out["mix_partner"] = np.full(n, -1, dtype=np.int64)
        out["mix_lam"] = np.ones(n, dtype=np.float32)
        out["mix_box"] = np.zeros((n, 4), dtype=np.int16)
    if policy.crop_pct:
        out["crop_pct"] = np.zeros(n, dtype=np.float32)
    return out


def val_views(n: int, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """Eval views: timm's resize-and-center-crop at ``policy.crop_pct``, or the whole image."""
    out = neutral_views(n, policy)
    if policy.crop_pct:
        out["crop_pct"][:] = policy.crop_pct
    return out


def _fixed_interp(name: str) -> str:
    return "bilinear" if name == "random" else name


def sample_views(key_hash: np.ndarray, seed: int, stream: int, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """Every parameter of one train view per sample (one column per :meth:`ViewPolicy.fields`)."""
    h64 = np.asarray(key_hash, dtype=np.uint64)
    out = neutral_views(len(h64), policy)
    out.update(sample_crops(h64, seed, stream, policy.scale, policy.ratio, policy.hflip))
    if policy.interpolation == "random":
        out["interp"] = (uniform(h64, seed, stream, _INTERP_DRAW) < 0.5).astype(np.uint8)
    else:
        out["interp"][:] = INTERPOLATIONS.index(policy.interpolation)
    if policy.rand_augment:
        out.update(sample_rand_augment(h64, seed, stream, policy.rand_augment))
    if policy.color_jitter:
        out.update(sample_color_jitter(h64, seed, stream, policy.color_jitter))
    if policy.erase_prob > 0:
        out.update(sample_erasing(h64, seed, stream, policy))
    if policy.mixes:
        out.update(sample_mixing(h64, seed, stream, policy))
    return out


def place_block(params: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
    """View columns of a block of rows that starts at row ``start`` of its table: the mixing
    partners :func:`sample_views` drew as positions within the block become rows of the table."""
    if "mix_partner" in params:
        p = params["mix_partner"]
        params = {**params, "mix_partner": np.where(p >= 0, p + start, p)}
    return params


def sample_crops(h64: np.ndarray, seed: int, stream: int, scale, ratio, hflip: float) -> dict[str, np.ndarray]:
    """Random-resized-crop parameters as fractions of the image (size-independent), plus a flip.

    The crop has area fraction ``s ~ U(scale)`` and aspect ``r`` log-uniform in ``ratio``; its
    sides as fractions are ``w = sqrt(s * r)``, ``h = sqrt(s / r)`` (for a square image; for other
    shapes the box is applied to each side's length, which keeps the area fraction).  Up to 10
    tries; a sample that never fits gets the centred square of side ``sqrt(scale[1])``.
    """
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


def sample_rand_augment(h64: np.ndarray, seed: int, stream: int, ra: RandAugment) -> dict[str, np.ndarray]:
    """Per layer, as timm's RandAugment: an op chosen uniformly (with replacement), applied with
    probability ``ra.prob``, at magnitude ``m`` (+ N(0, mstd), or U(0, m) when mstd is infinite)
    clipped to [0, mmax], negated with probability 1/2 for the signed ops."""
    n, layers = len(h64), ra.layers
    table = np.array([RA_OPS.index(o) for o in ra.ops], dtype=np.int8)
    op = np.zeros((n, layers), dtype=np.int8)
    applied = np.zeros((n, layers), dtype=bool)
    level = np.zeros((n, layers), dtype=np.float32)
    signed = np.array([o in _SIGNED_OPS for o in RA_OPS])
    for j in range(layers):
        d = _RA_DRAW + _RA_STRIDE * j
        pick = np.minimum((uniform(h64, seed, stream, d) * len(table)).astype(np.int64), len(table) - 1)
        op[:, j] = table[pick]
        applied[:, j] = uniform(h64, seed, stream, d + 1) <= ra.prob
        m = np.full(n, float(ra.magnitude))
        if ra.magnitude_std == math.inf:
            m = uniform(h64, seed, stream, d + 2) * ra.magnitude
        elif ra.magnitude_std > 0:
            m = ra.magnitude + ra.magnitude_std * gaussian(h64, seed, stream, d + 2)
        m = np.clip(m, 0.0, ra.magnitude_max)
        negate = signed[op[:, j]] & (uniform(h64, seed, stream, d + 4) < 0.5)
        level[:, j] = np.where(negate, -m, m)
    return {"ra_op": op, "ra_applied": applied, "ra_level": level}


def sample_color_jitter(h64: np.ndarray, seed: int, stream: int, jitter) -> dict[str, np.ndarray]:
    """torchvision's ColorJitter: brightness, contrast and saturation factors ~ U(max(0, 1 - j), 1 + j),
    a hue shift ~ U(-j, j), applied in a random order; a component of strength 0 is stored as nan
    (not applied)."""
    n = len(h64)
    factor = np.full((n, 4), np.nan, dtype=np.float32)
    for k, j in enumerate(jitter):
        if j <= 0:
            continue
        lo, hi = (-j, j) if k == 3 else (max(0.0, 1 - j), 1 + j)
        factor[:, k] = lo + (hi - lo) * uniform(h64, seed, stream, _CJ_DRAW + k)
    keys = np.stack([uniform(h64, seed, stream, _CJ_DRAW + 4 + k) for k in range(4)], axis=1)
    return {"cj_factor": factor, "cj_order": np.argsort(keys, axis=1, kind="stable").astype(np.int8)}


def sample_erasing(h64: np.ndarray, seed: int, stream: int, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """timm's RandomErasing on a ``size`` square: with probability ``erase_prob``, 1 .. ``erase_count``
    boxes, each of area U(0.02, 1/3) of the image / count and aspect log-uniform in (0.3, 1/0.3),
    up to 10 tries each; boxes as (top, left, height, width) in pixels, height 0 for none."""
    n, size, count_max = len(h64), policy.size, policy.erase_count
    box = np.zeros((n, count_max, 4), dtype=np.int16)
    on = uniform(h64, seed, stream, _ERASE_DRAW) < policy.erase_prob
    count = 1 + np.minimum((uniform(h64, seed, stream, _ERASE_DRAW + 1) * count_max).astype(np.int64), count_max - 1)
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for b in range(count_max):
        todo = np.flatnonzero(on & (b < count))
        for t in range(_ATTEMPTS):
            if not len(todo):
                break
            d = _ERASE_DRAW + 3 + 4 * (_ATTEMPTS * b + t)
            u = [uniform(h64[todo], seed, stream, d + k) for k in range(4)]
            area = (0.02 + (1 / 3 - 0.02) * u[0]) * size * size / count[todo]
            aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = (h < size) & (w < size) & (h > 0) & (w > 0)
            hit = todo[fits]
            top = np.minimum((u[2][fits] * (size - h[fits] + 1)).astype(np.int64), size - h[fits])
            left = np.minimum((u[3][fits] * (size - w[fits] + 1)).astype(np.int64), size - w[fits])
            box[hit, b] = np.stack([top, left, h[fits], w[fits]], axis=1)
            todo = todo[~fits]
    seed_col = (random_bits(h64, seed, stream, _ERASE_DRAW + 2) >> np.uint64(32)).astype(np.uint32)
    return {"erase_box": box.reshape(n, 4 * count_max), "erase_seed": seed_col}


def sample_mixing(h64: np.ndarray, seed: int, stream: int, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """timm's Mixup/CutMix per row (its ``elem`` mode, with a partner fixed per view rather than the
    batch flipped): a partner among the same rows (a position in them, by the order of the keys'
    hashes, so the choice does not depend on the input order), cutmix with probability
    ``mix_switch_prob`` when both are on, lambda ~ Beta(alpha, alpha), applied with probability
    ``mix_prob``; a cutmix box of side ``size * sqrt(1 - lambda)`` clipped at the border, lambda
    then corrected to the area kept (timm's ``correct_lam``).  ``mix_lam`` is the row's own weight."""
    from scipy.special import betaincinv

    n, size = len(h64), policy.size
    by_key = np.argsort(h64, kind="stable")
    partner = by_key[np.minimum((uniform(h64, seed, stream, _MIX_DRAW) * n).astype(np.int64), max(n - 1, 0))]
    if policy.mixup > 0 and policy.cutmix > 0:
        cut = uniform(h64, seed, stream, _MIX_DRAW + 1) < policy.mix_switch_prob
    else:
        cut = np.full(n, policy.cutmix > 0)
    alpha = np.where(cut, policy.cutmix, policy.mixup)
    lam = betaincinv(alpha, alpha, uniform(h64, seed, stream, _MIX_DRAW + 2))
    lam = np.where(uniform(h64, seed, stream, _MIX_DRAW + 3) < policy.mix_prob, lam, 1.0)
    box = np.zeros((n, 4), dtype=np.int16)
    cut_side = (size * np.sqrt(1.0 - lam)).astype(np.int64)
    centre = [np.minimum((uniform(h64, seed, stream, _MIX_DRAW + 4 + k) * size).astype(np.int64), size - 1)
              for k in range(2)]
    lo = [np.clip(c - cut_side // 2, 0, size) for c in centre]
    hi = [np.clip(c + cut_side // 2, 0, size) for c in centre]
    area = (hi[0] - lo[0]) * (hi[1] - lo[1])
    box[cut] = np.stack([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], axis=1)[cut]
    lam = np.where(cut, 1.0 - area / float(size * size), lam)
    return {"mix_partner": partner.astype(np.int64), "mix_lam": lam.astype(np.float32), "mix_box": box}


# ----------------------------------------------------------------------------- replay: pixels


def crop_box(params: dict, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (top, left, height, width) of the crop in an image of the given size."""
    top = int(round(params["crop_top"] * height))
    left = int(round(params["crop_left"] * width))
    h = max(1, int(round(params["crop_height"] * height)))
    w = max(1, int(round(params["crop_width"] * width)))
    h = min(h, height - top)
    w = min(w, width - left)
    return top, left, h, w


def view_array(img: Image.Image, params: dict, size: int, fill=(128, 128, 128)) -> np.ndarray:
    """The view of ``img`` described by ``params`` as uint8 pixels (size, size, 3): crop and resize
    (or the eval resize-and-center-crop), flip, RandAugment, color jitter.  ``fill`` is the colour
    the geometric RandAugment ops fill with (:attr:`ViewPolicy.fill`).

    Pure and deterministic: the same image and parameters give the same pixels, bit for bit.
    """
    resample = _PIL_INTERP[int(params.get("interp", 0))]
    if float(params.get("crop_pct", 0.0)) > 0:
        img = resize_center_crop(img, size, float(params["crop_pct"]), resample)
    else:
        top, left, h, w = crop_box(params, img.width, img.height)
        if (top, left, h, w) != (0, 0, img.height, img.width) or img.size != (size, size):
            img = img.crop((left, top, left + w, top + h)).resize((size, size), resample)
    if params["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if "ra_op" in params:
        for op, applied, level in zip(params["ra_op"], params["ra_applied"], params["ra_level"]):
            if applied:
                img = rand_augment_op(img, RA_OPS[int(op)], float(level), fill, resample)
    if "cj_factor" in params:
        for k in params["cj_order"]:
            f = float(params["cj_factor"][int(k)])
            if not math.isnan(f):
                img = color_jitter_op(img, int(k), f)
    return np.asarray(img, dtype=np.uint8)


def resize_center_crop(img: Image.Image, size: int, crop_pct: float, resample) -> Image.Image:
    """timm's eval transform: the shorter side resized to ``floor(size / crop_pct)`` (the longer in
    proportion, truncated, as torchvision's Resize), then the centred ``size`` square."""
    short = math.floor(size / crop_pct)
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != img.size:
        img = img.resize(new, resample)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
