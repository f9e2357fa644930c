"""SpectralKD and the official code's other ``DistillationLoss`` types.

Huang et al., "SpectralKD: A Unified Framework for Interpreting and Distilling Vision Transformers
via Spectral Analysis" (the official code builds on DeiT's ``DistillationLoss``).  With CE the
label-smoothed cross-entropy, KL = T^2 KL(softmax(z_t / T) || softmax(z_s / T)) and L_spec the mean
over layer pairs of MSE(rfft2(X_s), pool(S_t)) (:func:`stages.spectral.spectral_term`):

- ``none``: CE;
- ``logits``: (1 - alpha) CE + alpha KL (soft KD, the ablation without the spectral term);
- ``spectral`` (official ``soft``): (1 - alpha) CE + alpha KL + beta w_fft L_spec;
- ``spectral_only`` (official ``fft``): (1 - alpha) CE + beta w_fft L_spec;
- ``hard`` (DeiT's hard distillation): (1 - alpha) CE + alpha CE(z_s, argmax z_t), plus
  beta w_fft L_spec when the student has layer pairs.

Paper defaults (DeiT students): alpha 0.9, T 1, beta 1, w_fft 0.2 (0.05 for Swin), label smoothing 0.1.
Terms: ``ce``, ``kd`` (the KL, or the hard CE), ``spectral``, each weighted as above.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from stages.spectral import kd_kl, spectral_term

from .base import DistillLoss, LossSettings, Needs, cross_entropy, teacher_logits

SPECTRAL_KINDS = ("spectral", "spectral_only")  # the kinds whose spectral term needs layer pairs


class SpectralKDConfig(LossSettings):
    kind: Literal["none", "logits", "spectral", "spectral_only", "hard"] = "spectral"
    alpha: float = Field(0.9, ge=0, le=1)
    tau: float = Field(1.0, gt=0)
    beta: float = Field(1.0, ge=0)
    w_fft: float = Field(0.2, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class SpectralKD(DistillLoss):
    kinds = ("none", "logits", "spectral", "spectral_only", "hard")
    Config = SpectralKDConfig

    @classmethod
    def needs(cls, config: SpectralKDConfig, has_pairs: bool) -> Needs:
        spectral = config.kind in SPECTRAL_KINDS or (config.kind == "hard" and has_pairs)
        return Needs(logits=config.kind in ("logits", "spectral", "hard"),
                     form="spectra" if spectral else None, pooled=spectral)

    @classmethod
    def check(cls, config: SpectralKDConfig, pairs: list) -> str | None:
        if config.kind in SPECTRAL_KINDS and not pairs:
            return f"loss.kind {config.kind!r} needs pairs: [[student_layer, teacher_layer], ...]"
        return None

    def terms(self, student, teacher, labels, epoch):
        c = self.config
        ce = cross_entropy(student.logits, labels, c.label_smoothing)
        if c.kind == "none":
            return {"ce": ce}
        out = {"ce": (1 - c.alpha) * ce}
        if c.kind == "hard":
            target = teacher_logits(teacher, c.kind).argmax(dim=1)
            out["kd"] = c.alpha * F.cross_entropy(student.logits.float(), target)
        elif c.kind != "spectral_only":
            out["kd"] = c.alpha * kd_kl(student.logits, teacher_logits(teacher, c.kind), c.tau)
        if self.needs(c, bool(student.features)).reads_layers:
            out["spectral"] = c.beta * c.w_fft * spectral_term(student.features, teacher.layers, c.kind)
        return out

