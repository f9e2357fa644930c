"""ViTKD: mimicking for the shallow layers, masked generation for the deep one.

Yang et al., "ViTKD: Practical Guidelines for ViT feature knowledge distillation", 2022.  The layer
pairs before the last are mimicked: each student map goes through a per-token linear map to the
teacher's width (none when the widths are equal) and is compared with the teacher's map.  The last
pair is generated: its student map, mapped to the teacher's width, has a fraction lambda of its
H*W tokens (drawn per sample) replaced by a learned mask token, and a generation block
(conv3x3 - ReLU - conv3x3) must produce the teacher's map at the masked tokens.  With sums of
squares over channels and positions, and B the batch size:

    L = CE + alpha / B sum_{shallow pairs} ||lin(X_s) - X_t||^2
           + beta / (lambda B) sum_{masked tokens} ||G(mask(align(X_s))) - X_t||^2.

Defaults: yzd-v/cls_KD, ``ViTKDLoss`` (``mmcls/distillation/losses/vitkd.py``) with
``configs/distillers/imagenet/deit-s3_distill_deit-t_img.py``: alpha 3e-5, beta 3e-6, lambda 0.5 (per
sample, the first int(H*W*(1 - lambda)) tokens of a random order are kept, the others masked); CE
weight 1 with label smoothing 0.1 (DeiT's recipe).  Masks come from torch's global generator (:meth:`ViTKD.token_mask`).
Extras: ``mimic`` (one map per shallow pair), ``align``, ``mask_token`` and ``generation`` (the last
pair).  Terms: ``ce``, ``mimic`` (when there are shallow pairs), ``generation`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import (DistillLoss, LossSettings, Needs, cross_entropy, generation_block, missing_layers, teacher_layers,
                   width_map)


class ViTKDConfig(LossSettings):
    kind: Literal["vitkd"] = "vitkd"
    alpha: float = Field(3e-5, ge=0)  # mimicking weight
    beta: float = Field(3e-6, ge=0)  # generation weight
    mask_ratio: float = Field(0.5, gt=0, lt=1)  # lambda: the fraction of the deep map's tokens masked


class ViTKD(DistillLoss):
    kinds = ("vitkd",)
    Config = ViTKDConfig

    def __init__(self, config, pairs=(), num_classes=0):
        super().__init__(config, pairs, num_classes)
        self.mimic = torch.nn.ModuleList(width_map(p.student_shape[0], p.teacher_shape[0]) for p in self.pairs[:-1])
        if self.pairs:
            deep = self.pairs[-1]
            c_t = deep.teacher_shape[0]
            self.align = width_map(deep.student_shape[0], c_t)
            self.mask_token = torch.nn.Parameter(torch.zeros(c_t))  # 1-D: no weight decay, as timm's tokens
            self.generation = generation_block(c_t)

    @classmethod
    def needs(cls, config: ViTKDConfig, has_pairs: bool) -> Needs:
        return Needs(form="features")

    @classmethod
    def check(cls, config: ViTKDConfig, pairs: list) -> str | None:
        return missing_layers(config, pairs)

    def token_mask(self, batch: int, positions: int, device=None) -> torch.Tensor:
        """(batch, positions) float, 1 at the masked tokens: per sample, the tokens after the first
        int(positions * (1 - lambda)) of a uniformly random order (drawn on the CPU generator)."""
        keep = int(positions * (1 - self.config.mask_ratio))
        order = torch.rand(batch, positions).argsort(dim=1)
        return torch.zeros(batch, positions).scatter_(1, order[:, keep:], 1.0).to(device)

    def generated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the generation block's output, the mask as (B, 1, H, W)) for the deep student map ``x``."""
        x = self.align(x)
        b, c, h, w = x.shape
        m = self.token_mask(b, h * w, x.device).view(b, 1, h, w)
        return self.generation(x * (1 - m) + self.mask_token.view(1, c, 1, 1) * m), m

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        targets = teacher_layers(teacher, student, c.kind)
        b = student.logits.shape[0]
        out = {"ce": cross_entropy(student.logits, labels, c.label_smoothing)}
        if self.mimic:
            sq = sum((lin(f) - t).pow(2).sum() for lin, f, t in zip(self.mimic, student.features, targets))
            out["mimic"] = c.alpha * sq / b
        g, m = self.generated(student.features[-1])
        out["generation"] = c.beta * ((g - targets[-1]).pow(2) * m).sum() / (b * c.mask_ratio)
        return out
