"""NKD: normalized knowledge distillation.

Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels", ICCV 2023.  With t the target class, S = softmax(z_s),
T = softmax(z_t), and S^, T^ the softmax over the non-target logits at temperature tau (each
normalized to sum 1 among the non-target classes):

    L = CE - mean_b T_t log S_t - gamma tau^2 mean_b sum_{k != t} T^_k log S^_k.

The target term uses temperature 1, as the reference.  Defaults: yzd-v/cls_KD, ``NKDLoss``
(``mmcls/distillation/losses/nkd.py``) with ``configs/distillers/imagenet/deit-s3_distill_deit-t_img.py``
(the ViT students: tau 1, gamma 1; the class's own default gamma is 1.5, its ResNet setting); CE
weight 1 with label smoothing 0.1 (DeiT's recipe).  A mixed label's target class is its most
probable one, as the reference.  Terms: ``ce``, ``target``, ``non_target`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from .base import DistillLoss, LossSettings, Needs, cross_entropy, non_target, target_class, teacher_logits


class NKDConfig(LossSettings):
    kind: Literal["nkd"] = "nkd"
    tau: float = Field(1.0, gt=0)  # the reference's temp, for the non-target term
    gamma: float = Field(1.0, ge=0)  # non-target term weight


class NKD(DistillLoss):
    kinds = ("nkd",)
    Config = NKDConfig

    @classmethod
    def needs(cls, config: NKDConfig, has_pairs: bool) -> Needs:
        return Needs(logits=True)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        zs, zt = student.logits.float(), teacher_logits(teacher, c.kind)
        t = target_class(labels)[:, None]
        target = -(F.softmax(zt, dim=1).gather(1, t) * F.log_softmax(zs, dim=1).gather(1, t)).mean()
        log_s = F.log_softmax(non_target(zs, t[:, 0]) / c.tau, dim=1)
        p_t = F.softmax(non_target(zt, t[:, 0]) / c.tau, dim=1)
        rest = -(p_t * log_s).sum(dim=1).mean()
        return {"ce": cross_entropy(zs, labels, c.label_smoothing), "target": target,
                "non_target": c.gamma * c.tau * c.tau * rest}
