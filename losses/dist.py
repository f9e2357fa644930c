"""DIST: distillation by Pearson-correlation relations of the class probabilities.

Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.  With
Y = softmax(z / tau) for student and teacher (B, K) and rho the Pearson correlation
(cosine similarity of mean-centered vectors, eps 1e-8 beside the norms' product):

    inter = 1 - mean over rows b of rho(Y_s[b, :], Y_t[b, :])   (each sample's class ranking)
    intra = 1 - mean over classes k of rho(Y_s[:, k], Y_t[:, k])  (each class across the batch)
    L = CE + w (beta tau^2 inter + gamma tau^2 intra).

Defaults: hunto/DIST_KD (its classification code, hunto/image_classification_sota:
``lib/models/losses/dist_kd.py`` and ``configs/strategies/distill/resnet_dist.yaml`` for ImageNet):
beta 1, gamma 1, tau 1, KD weight w 2, CE weight 1; label smoothing 0.1 on the CE as DeiT's recipe.
Terms: ``ce``, ``inter``, ``intra`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import DistillLoss, LossSettings, Needs, cross_entropy, teacher_logits

EPS = 1e-8  # beside the product of the norms in the cosine, as the reference


class DISTConfig(LossSettings):
    kind: Literal["dist"] = "dist"
    beta: float = Field(1.0, ge=0)  # inter-class relation weight
    gamma: float = Field(1.0, ge=0)  # intra-class relation weight
    tau: float = Field(1.0, gt=0)
    kd_weight: float = Field(2.0, ge=0)  # the reference's kd_loss_weight on beta*inter + gamma*intra


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (B,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def relation_losses(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra), each times tau^2."""
    ys, yt = (zs / tau).softmax(dim=1), (zt / tau).softmax(dim=1)
    inter = 1 - pearson_rows(ys, yt).mean()
    intra = 1 - pearson_rows(ys.t(), yt.t()).mean()
    return tau * tau * inter, tau * tau * intra


class DIST(DistillLoss):
    kinds = ("dist",)
    Config = DISTConfig

    @classmethod
    def needs(cls, config: DISTConfig, has_pairs: bool) -> Needs:
        return Needs(logits=True)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        zs = student.logits.float()
        inter, intra = relation_losses(zs, teacher_logits(teacher, c.kind), c.tau)
        return {"ce": cross_entropy(zs, labels, c.label_smoothing),
                "inter": c.kd_weight * c.beta * inter, "intra": c.kd_weight * c.gamma * intra}
