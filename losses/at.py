"""Attention transfer: matching spatial attention maps.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017.  A map X (C, H, W) gives the
spatial attention A(X) = mean over channels of |X|^p, flattened over the H*W positions and
L2-normalized; student and teacher maps of a pair share the grid, not the width:

    L = CE + w sum over pairs of mean_{b, position} (A(X_s) - A(X_t))^2.

Defaults: megvii-research/mdistiller ``distillers/AT.py`` with ``engine/cfg.py`` (p 2, feature
weight w 1000, CE weight 1, the pairs' losses summed); label smoothing 0.1 on the CE as DeiT's
recipe.  No extras.  Terms: ``ce``, ``at`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import DistillLoss, LossSettings, Needs, cross_entropy, missing_layers, teacher_layers


class ATConfig(LossSettings):
    kind: Literal["at"] = "at"
    p: float = Field(2.0, gt=0)
    weight: float = Field(1000.0, ge=0)  # mdistiller's AT.LOSS.FEAT_WEIGHT


def attention(x: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |x|^p, L2-normalized over positions."""
    return F.normalize(x.abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AT(DistillLoss):
    kinds = ("at",)
    Config = ATConfig

    @classmethod
    def needs(cls, config: ATConfig, has_pairs: bool) -> Needs:
        return Needs(form="features")

    @classmethod
    def check(cls, config: ATConfig, pairs: list) -> str | None:
        return missing_layers(config, pairs)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        targets = teacher_layers(teacher, student, c.kind)
        at = sum((attention(f, c.p) - attention(t, c.p)).pow(2).mean() for f, t in zip(student.features, targets))
        return {"ce": cross_entropy(student.logits, labels, c.label_smoothing), "at": c.weight * at}
