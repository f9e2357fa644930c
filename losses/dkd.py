"""DKD: decoupled knowledge distillation.

Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.  KD's KL splits into the target-class
binary KL (TCKD) and the KL among the non-target classes (NCKD), weighted separately.  With t the
target class, p = softmax(z / T), b = (p_t, 1 - p_t) and p^ = softmax over the non-target logits / T:

    L = CE + w(e) (alpha TCKD + beta NCKD),
    TCKD = T^2 KL(b^teacher || b^student),  NCKD = T^2 KL(p^teacher || p^student)  (batch means),
    w(e) = min((e + 1) / warmup, 1) at (0-based) epoch e.

Defaults: megvii-research/mdistiller, ``configs/imagenet/r34_r18/dkd.yaml`` over ``engine/cfg.py``
(CE weight 1, alpha 1, beta 0.5, T 1, warmup 1 epoch: mdistiller counts epochs from 1 and scales by
``min(epoch / warmup, 1)``); label smoothing 0.1 on the CE as DeiT's recipe.  A mixed label's target
class is its most probable one.  Terms: ``ce``, ``tckd``, ``nckd`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import DistillLoss, LossSettings, Needs, cross_entropy, non_target, target_class, teacher_logits


class DKDConfig(LossSettings):
    kind: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0)  # TCKD weight
    beta: float = Field(0.5, ge=0)  # NCKD weight
    tau: float = Field(1.0, gt=0)
    warmup: int = Field(1, ge=1)  # epochs over which the KD part rises linearly to its weight


def binary_log_probs(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, K) log-probabilities -> (B, 2): log p_t and log (1 - p_t), the latter as the logsumexp of
    the non-target log-probabilities (no cancellation when p_t is near 1)."""
    return torch.stack([log_p.gather(1, target[:, None])[:, 0],
                        torch.logsumexp(non_target(log_p, target), dim=1)], dim=1)


def kl_from_logs(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) from log-probabilities, batch mean."""
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")


def tckd(zs: torch.Tensor, zt: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    bs = binary_log_probs(F.log_softmax(zs / tau, dim=1), target)
    bt = binary_log_probs(F.log_softmax(zt / tau, dim=1), target)
    return tau * tau * kl_from_logs(bs, bt)


def nckd(zs: torch.Tensor, zt: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    ls = F.log_softmax(non_target(zs, target) / tau, dim=1)
    lt = F.log_softmax(non_target(zt, target) / tau, dim=1)
    return tau * tau * kl_from_logs(ls, lt)


class DKD(DistillLoss):
    kinds = ("dkd",)
    Config = DKDConfig

    @classmethod
    def needs(cls, config: DKDConfig, has_pairs: bool) -> Needs:
        return Needs(logits=True)

    def warmup_factor(self, epoch: int) -> float:
        return min((epoch + 1) / self.config.warmup, 1.0)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        zs, zt = student.logits.float(), teacher_logits(teacher, c.kind)
        target = target_class(labels)
        w = self.warmup_factor(epoch)
        return {"ce": cross_entropy(zs, labels, c.label_smoothing),
                "tckd": w * c.alpha * tckd(zs, zt, target, c.tau),
                "nckd": w * c.beta * nckd(zs, zt, target, c.tau)}
