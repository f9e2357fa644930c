"""FitNets: hints through a learned regressor.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.  Each paired student map X_s
(C_s, H, W) is mapped to the teacher's width by a regressor r, here a per-token linear map (a 1x1
convolution, C_s -> C_t: a ViT's tokens are signed, so no normalization or ReLU follows), and
compared with the teacher's map X_t:

    L = CE + w sum over pairs of MSE(r(X_s), X_t)   (mean over B, C_t, H, W).

Defaults: megvii-research/mdistiller ``distillers/FitNet.py`` with ``engine/cfg.py`` (feature weight
w 100, CE weight 1; mdistiller's ``ConvReg`` is a CNN's conv + BN + ReLU, and it hints one layer:
one pair here gives its loss); label smoothing 0.1 on the CE as DeiT's recipe.  Extras: one
regressor per pair (``regressors``).  Terms: ``ce``, ``hint`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import DistillLoss, LossSettings, Needs, cross_entropy, missing_layers, teacher_layers


class FitNetsConfig(LossSettings):
    kind: Literal["fitnets"] = "fitnets"
    weight: float = Field(100.0, ge=0)  # mdistiller's FITNET.LOSS.FEAT_WEIGHT


class FitNets(DistillLoss):
    kinds = ("fitnets",)
    Config = FitNetsConfig

    def __init__(self, config, pairs=(), num_classes=0):
        super().__init__(config, pairs, num_classes)
        self.regressors = torch.nn.ModuleList(
            torch.nn.Conv2d(p.student_shape[0], p.teacher_shape[0], kernel_size=1) for p in self.pairs)

    @classmethod
    def needs(cls, config: FitNetsConfig, has_pairs: bool) -> Needs:
        return Needs(form="features")

    @classmethod
    def check(cls, config: FitNetsConfig, pairs: list) -> str | None:
        return missing_layers(config, pairs)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        targets = teacher_layers(teacher, student, c.kind)
        hint = sum(F.mse_loss(reg(f), t) for reg, f, t in zip(self.regressors, student.features, targets))
        return {"ce": cross_entropy(student.logits, labels, c.label_smoothing), "hint": c.weight * hint}
