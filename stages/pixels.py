"""The pixel operations a view's replay applies: timm's RandAugment ops at a level, torchvision's
color-jitter components (on PIL images), and timm's random erasing and Mixup/CutMix on normalized
view tensors.  Which op, level, box or partner each view takes is drawn by :mod:`stages.views`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from pipeline.config import RAND_AUGMENT_LEVELS

_TRANSLATE_PCT = 0.45  # timm's translate_pct for TranslateXRel / TranslateYRel


def rand_augment_op(img: Image.Image, name: str, level: float, fill, resample) -> Image.Image:
    """One RandAugment op at a signed magnitude level (0..10, timm's scale), as timm's op table maps
    levels to arguments (timm.data.auto_augment: LEVEL_TO_ARG, NAME_TO_OP)."""
    m = abs(level) / RAND_AUGMENT_LEVELS
    sign = -1.0 if level < 0 else 1.0
    affine = {"resample": resample, "fillcolor": fill}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(sign * m * 30.0, **affine)
    if name == "Posterize":
        return _posterize(img, int(m * 4))
    if name == "PosterizeIncreasing":
        return _posterize(img, 4 - int(m * 4))
    if name == "Solarize":
        return ImageOps.solarize(img, min(256, int(m * 256)))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - min(256, int(m * 256)))
    if name == "SolarizeAdd":
        return _solarize_add(img, min(128, int(m * 110)))
    if name in _ENHANCERS:
        return _ENHANCERS[name](img).enhance(m * 1.8 + 0.1)
    if name.endswith("Increasing") and name[: -len("Increasing")] in _ENHANCERS:
        return _ENHANCERS[name[: -len("Increasing")]](img).enhance(max(0.1, 1.0 + sign * m * 0.9))
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, sign * m * 0.3, 0, 0, 1, 0), **affine)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * m * 0.3, 1, 0), **affine)
    if name == "TranslateXRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, sign * m * _TRANSLATE_PCT * img.size[0], 0, 1, 0),
                             **affine)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * m * _TRANSLATE_PCT * img.size[1]),
                             **affine)
    raise ValueError(f"unknown RandAugment op {name!r}")


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep ``bits`` high bits per channel; 0 bits is black (as PIL did before it refused 0, which
    timm's PosterizeIncreasing asks for at magnitude 10)."""
    if bits >= 8:
        return img
    return img.point([0] * 256 * len(img.getbands())) if bits <= 0 else ImageOps.posterize(img, bits)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def color_jitter_op(img: Image.Image, component: int, factor: float) -> Image.Image:
    """Component 0-3 of torchvision's ColorJitter (brightness, contrast, saturation, hue) at ``factor``."""
    from torchvision.transforms import functional as F

    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)[component]
    return adjust(img, factor)


# ----------------------------------------------------------------------------- erasing and mixing


def erase(x: torch.Tensor, boxes: np.ndarray, seeds: np.ndarray, mode: str) -> torch.Tensor:
    """timm's RandomErasing on normalized views ``x`` (B, C, H, W), in place: each row's boxes
    (``erase_box``: (top, left, height, width) per box, height 0 for none) are filled with N(0, 1)
    noise per pixel (``pixel``), per channel (``rand``) or zeros (``const``); the noise comes from a
    CPU generator seeded by the row's ``erase_seed``, so every device gets the same values."""
    boxes = np.asarray(boxes).reshape(len(x), -1, 4)
    for i in np.flatnonzero(boxes[:, :, 2].max(axis=1) > 0):
        g = torch.Generator().manual_seed(int(seeds[i]))
        for top, left, h, w in boxes[i].tolist():
            if h <= 0:
                continue
            shape = (x.shape[1], h, w) if mode == "pixel" else (x.shape[1], 1, 1)
            fill = torch.zeros(shape) if mode == "const" else torch.randn(shape, generator=g)
            x[i, :, top : top + h, left : left + w] = fill.to(x.device, x.dtype)
    return x


def mix(x: torch.Tensor, partner: torch.Tensor, lam: np.ndarray, box: np.ndarray) -> torch.Tensor:
    """timm's Mixup/CutMix on normalized views, in place: a row with a cutmix box takes its
    partner's pixels inside it; any other row with ``lam < 1`` becomes ``lam x + (1 - lam) partner``."""
    box = np.asarray(box).reshape(len(x), 4)
    lam = np.asarray(lam, dtype=np.float32)
    for i in np.flatnonzero((box[:, 2] > 0) & (box[:, 3] > 0)):
        top, left, h, w = box[i].tolist()
        x[i, :, top : top + h, left : left + w] = partner[i, :, top : top + h, left : left + w]
    blend = np.flatnonzero((box[:, 2] == 0) & (lam < 1))
    if len(blend):
        b = torch.from_numpy(blend).to(x.device)
        w = torch.from_numpy(lam[blend]).to(x.device, x.dtype).view(-1, 1, 1, 1)
        x[b] = x[b] * w + partner[b] * (1 - w)
    return x
