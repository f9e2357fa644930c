"""MGD: masked generative distillation.

Yang et al., "Masked Generative Distillation", ECCV 2022.  Each paired student map is mapped to the
teacher's width (a 1x1 convolution, none when the widths are equal), each of its channels is zeroed
with probability lambda, per sample (the classification setting; detection masks positions), and a
generation block (conv3x3 - ReLU - conv3x3) must produce the teacher's whole map from it:

    L = CE + alpha / B sum over pairs of ||G(align(X_s) * M) - X_t||^2   (sums over C, H, W),

M (B, C_t, 1, 1) being 0 where a uniform draw is below lambda and 1 elsewhere.  Defaults:
yzd-v/cls_KD ``MGDLoss`` (``mmcls/distillation/losses/mgd.py``) with
``configs/distillers/imagenet/res34_distill_res18_img.py``: alpha 7e-5, lambda 0.15 (cls_KD applies
it to the last stage: one pair gives its loss); CE weight 1 with label smoothing 0.1 (DeiT's recipe).
Masks come from torch's global generator (:meth:`MGD.channel_mask`, one per pair in order).  Extras:
``aligns`` and ``generators``, one per pair.  Terms: ``ce``, ``mgd`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import (DistillLoss, LossSettings, Needs, cross_entropy, generation_block, missing_layers, teacher_layers,
                   width_map)


class MGDConfig(LossSettings):
    kind: Literal["mgd"] = "mgd"
    alpha: float = Field(7e-5, ge=0)
    mask_ratio: float = Field(0.15, ge=0, lt=1)  # lambda: the fraction of channels zeroed


class MGD(DistillLoss):
    kinds = ("mgd",)
    Config = MGDConfig

    def __init__(self, config, pairs=(), num_classes=0):
        super().__init__(config, pairs, num_classes)
        self.aligns = torch.nn.ModuleList(width_map(p.student_shape[0], p.teacher_shape[0]) for p in self.pairs)
        self.generators = torch.nn.ModuleList(generation_block(p.teacher_shape[0]) for p in self.pairs)

    @classmethod
    def needs(cls, config: MGDConfig, has_pairs: bool) -> Needs:
        return Needs(form="features")

    @classmethod
    def check(cls, config: MGDConfig, pairs: list) -> str | None:
        return missing_layers(config, pairs)

    def channel_mask(self, batch: int, channels: int, device=None) -> torch.Tensor:
        """(batch, channels, 1, 1): 0 where a uniform draw (CPU generator) is below lambda, else 1."""
        return (torch.rand(batch, channels, 1, 1) >= self.config.mask_ratio).float().to(device)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        targets = teacher_layers(teacher, student, c.kind)
        b = student.logits.shape[0]
        sq = 0.0
        for align, gen, f, t in zip(self.aligns, self.generators, student.features, targets):
            x = align(f)
            sq = sq + (gen(x * self.channel_mask(b, x.shape[1], x.device)) - t).pow(2).sum()
        return {"ce": cross_entropy(student.logits, labels, c.label_smoothing), "mgd": c.alpha * sq / b}
