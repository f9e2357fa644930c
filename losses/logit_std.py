"""Logit standardization: KD on z-scored logits.

Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.  Each row of logits is
z-scored before the softmax, Z(z) = (z - mean(z)) / (std(z) + 1e-7) (the sample standard deviation
over the K classes, ddof 1, as the reference's ``torch.std``), so the student matches the teacher's
logit relations rather than their range:

    L = CE + w tau^2 KL(softmax(Z(z_t) / tau) || softmax(Z(z_s) / tau))   (batch mean).

Defaults: sunshangquan/logit-standardization-KD for ImageNet (README: ``configs/imagenet/r34_r18/kd.yaml
--logit-stand --base-temp 2 --kd-weight 9``): base temperature tau 2, KD weight w 9, CE weight 1;
label smoothing 0.1 on the CE as DeiT's recipe.  Terms: ``ce``, ``kd`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stages.spectral import kd_kl

from .base import DistillLoss, LossSettings, Needs, cross_entropy, teacher_logits

EPS = 1e-7  # beside the standard deviation, as the reference


class LogitStdConfig(LossSettings):
    kind: Literal["logit_std"] = "logit_std"
    tau: float = Field(2.0, gt=0)  # base temperature
    kd_weight: float = Field(9.0, ge=0)


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Each row z-scored: (z - mean) / (sample std + 1e-7)."""
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + EPS)


class LogitStd(DistillLoss):
    kinds = ("logit_std",)
    Config = LogitStdConfig

    @classmethod
    def needs(cls, config: LogitStdConfig, has_pairs: bool) -> Needs:
        return Needs(logits=True)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        zs = student.logits.float()
        kd = kd_kl(standardize(zs), standardize(teacher_logits(teacher, c.kind)), c.tau)
        return {"ce": cross_entropy(zs, labels, c.label_smoothing), "kd": c.kd_weight * kd}
