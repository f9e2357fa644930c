"""The SpectralKD objective as an ``nn.Module`` (:func:`stages.spectral.spectralkd_loss`)."""

from __future__ import annotations

import torch

from stages.spectral import LossTerms, spectralkd_loss


class SpectralKDLoss(torch.nn.Module):
    """``loss(student_logits, labels, teacher_logits, student_feats, teacher_specs)`` -> LossTerms
    (``total`` to backpropagate; ``ce``, ``kd``, ``spec`` to log), the official DistillationLoss
    types selected by ``kind`` ('none', 'logits', 'spectral', 'spectral_only', 'hard'), with the
    weights of a student's ``loss:`` section."""

    def __init__(self, kind: str = "spectral", alpha: float = 0.9, tau: float = 1.0, beta: float = 1.0,
                 w_fft: float = 0.2, label_smoothing: float = 0.1):
        super().__init__()
        self.kind, self.alpha, self.tau, self.beta = kind, alpha, tau, beta
        self.w_fft, self.label_smoothing = w_fft, label_smoothing

    @classmethod
    def of(cls, loss_config) -> "SpectralKDLoss":
        """The loss a student's ``loss:`` section (:class:`pipeline.config.LossConfig`) declares."""
        return cls(**loss_config.model_dump())

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                student_feats: list[torch.Tensor] | None = None,
                teacher_specs: list[torch.Tensor] | None = None) -> LossTerms:
        return spectralkd_loss(student_logits, labels, teacher_logits, student_feats, teacher_specs, kind=self.kind,
                               alpha=self.alpha, tau=self.tau, beta=self.beta, w_fft=self.w_fft,
                               label_smoothing=self.label_smoothing)
