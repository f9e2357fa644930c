"""DeiT's distillation token: a second head learns from the teacher.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021.  The student is one of timm's ``*_distilled_*`` models: a distillation token beside the
class token, with its own head ``head_dist``.  In training (``set_distilled_training(True)``, set
by :meth:`DistillToken.prepare`) the model returns both heads' logits, z_cls and z_dist; at eval
timm averages the two heads.  With y the label and z_t the teacher's logits:

- ``hard``: (1 - alpha) CE(z_cls, y) + alpha CE(z_dist, argmax z_t)  (alpha 0.5: DeiT's hard distillation);
- ``soft``: (1 - alpha) CE(z_cls, y) + alpha tau^2 KL(softmax(z_t / tau) || softmax(z_dist / tau)),
  the paper's batch-mean KL (facebookresearch/deit ``losses.py`` divides the summed KL by B*K, its
  "legacy PyTorch behavior").

Defaults: facebookresearch/deit ``main.py`` (``--distillation-type`` hard as the paper's models,
``--distillation-alpha`` 0.5, ``--distillation-tau`` 1.0, ``--smoothing`` 0.1 on the class head's CE;
the teacher's hard label takes no smoothing).  Terms: ``ce``, ``kd`` (each weighted).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from stages.spectral import kd_kl

from .base import DistillLoss, LossSettings, Needs, cross_entropy, teacher_logits


class DistillTokenConfig(LossSettings):
    kind: Literal["distill_token"] = "distill_token"
    type: Literal["hard", "soft"] = "hard"
    alpha: float = Field(0.5, ge=0, le=1)
    tau: float = Field(1.0, gt=0)


def has_distillation_head(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "head_dist", None), torch.nn.Module) and hasattr(model, "set_distilled_training")


def distilled_models() -> list[str]:
    """timm's models whose names say they have a distillation token (``*_distilled_*``)."""
    import timm

    return timm.list_models("*_distilled_*")


class DistillToken(DistillLoss):
    kinds = ("distill_token",)
    Config = DistillTokenConfig

    @classmethod
    def needs(cls, config: DistillTokenConfig, has_pairs: bool) -> Needs:
        return Needs(logits=True)

    @classmethod
    def check_model(cls, config: DistillTokenConfig, model: torch.nn.Module) -> str | None:
        if has_distillation_head(model):
            return None
        name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        return (f"loss.kind 'distill_token' needs a student with a distillation token, and {name} has none; "
                f"timm's *_distilled_* models have one ({', '.join(distilled_models()[:6])}, ...)")

    def prepare(self, model: torch.nn.Module) -> None:
        model.set_distilled_training(True)

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        if student.dist_logits is None:
            raise ValueError("loss kind 'distill_token' needs the student's distillation head's logits "
                             "(a timm *_distilled_* model, set up by DistillToken.prepare)")
        zt = teacher_logits(teacher, c.kind)
        z_dist = student.dist_logits.float()
        if c.type == "hard":
            kd = F.cross_entropy(z_dist, zt.argmax(dim=1))
        else:
            kd = kd_kl(z_dist, zt, c.tau)
        return {"ce": (1 - c.alpha) * cross_entropy(student.logits, labels, c.label_smoothing), "kd": c.alpha * kd}
