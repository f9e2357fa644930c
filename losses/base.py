"""The contract of a distillation loss (ARCHITECTURE.md, "A loss").

A loss is one class.  It declares:

* ``kinds`` and ``Config``: the ``loss.kind`` values it answers to and its config section, a
  :class:`LossSettings` whose ``kind`` field is the discriminator of the schema's union;
* :meth:`DistillLoss.needs`: what it reads of the teacher (:class:`Needs`: the logits, and the paired
  teacher layers as spectra or as feature maps);
* its trainable extras (regressors, projectors, generators) as submodules, built in ``__init__``
  from the layer pairs' shapes: the trainer optimizes them with the student and keeps them in
  ``ckpt.pt`` and ``final.pt``;
* :meth:`DistillLoss.terms`: the weighted terms whose sum is the loss, each logged in its own
  ``metrics.parquet`` column (``loss_<term>``).

Teacher targets are constants: no gradient flows into them.  Labels are class indices (B,) or class
probabilities (B, K) (mixup/cutmix); a method that needs one target class per row takes the most
probable one (:func:`target_class`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.schema import Section

Form = Literal["spectra", "features"]


class LossSettings(Section):
    """Fields every loss has: its kind and the label smoothing of its cross-entropy term."""

    kind: str
    label_smoothing: float = Field(0.1, ge=0, lt=1)


@dataclass(frozen=True)
class Needs:
    """What a loss reads of the teacher for one student.

    logits: the teacher's logits.
    form: how the paired teacher layers are handed to the loss, ``"spectra"`` (the dense rfft2,
        (B, C, H, W//2+1, 2)) or ``"features"`` (the NCHW map); None: no teacher layer is read.
    pooled: the teacher layers are averaged down to the student's width before the loss (SpectralKD
        compares channels directly); otherwise they come at the width the cache stores.
    """

    logits: bool = False
    form: Form | None = None
    pooled: bool = False

    @property
    def reads_layers(self) -> bool:
        return self.form is not None

    @property
    def reads_teacher(self) -> bool:
        return self.logits or self.reads_layers


@dataclass(frozen=True)
class LayerPair:
    """One (student layer, teacher layer) pair with the shapes of both maps, (C, H, W) each; the
    teacher's width is the one the loss receives (a channel-pooled cache's width)."""

    student: int
    teacher: int
    student_shape: tuple[int, int, int]
    teacher_shape: tuple[int, int, int]


@dataclass
class StudentOutputs:
    """One forward pass of the student: the class head's logits, its NCHW maps at the paired layers
    (one per pair) and, for a student with a distillation token, that head's logits."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)
    dist_logits: torch.Tensor | None = None


@dataclass
class TeacherTargets:
    """The teacher's side of a batch: logits (when needed) and one tensor per pair in the form the
    loss declared (the same teacher layer twice when two pairs share it)."""

    logits: torch.Tensor | None = None
    layers: list[torch.Tensor] = field(default_factory=list)


class DistillLoss(torch.nn.Module):
    """Base of every registered loss; subclasses set ``kinds``, ``Config`` and :meth:`terms`, and
    override :meth:`needs`, :meth:`check`, :meth:`check_model` and :meth:`prepare` as they need."""

    kinds: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[LossSettings]] = LossSettings

    def __init__(self, config: LossSettings, pairs: tuple[LayerPair, ...] = (), num_classes: int = 0):
        super().__init__()
        self.config = config
        self.pairs = tuple(pairs)
        self.num_classes = num_classes
        self.reads = self.needs(config, bool(self.pairs))  # what it reads of the teacher

    @classmethod
    def needs(cls, config: LossSettings, has_pairs: bool) -> Needs:
        """What the loss reads of the teacher, for a student with or without layer pairs."""
        return Needs()

    @classmethod
    def check(cls, config: LossSettings, pairs: list) -> str | None:
        """Why a student with these layer pairs cannot train with this config (None: it can)."""
        return None

    @classmethod
    def check_model(cls, config: LossSettings, model: torch.nn.Module) -> str | None:
        """Why the student model (built on the meta device) cannot train with this loss (None: it can)."""
        return None

    def prepare(self, model: torch.nn.Module) -> None:
        """Set the student model up for this loss before training (e.g. a second head's output)."""

    def terms(self, student: StudentOutputs, teacher: TeacherTargets, labels: torch.Tensor,
              epoch: int) -> dict[str, torch.Tensor]:
        """The weighted terms of the loss, in the order they are summed."""
        raise NotImplementedError

    def forward(self, student: StudentOutputs, teacher: TeacherTargets, labels: torch.Tensor,
                epoch: int = 0) -> dict[str, torch.Tensor]:
        """``{"total": the loss, **terms}``: the total is the terms' sum, in order."""
        terms = self.terms(student, teacher, labels, epoch)
        values = iter(terms.values())
        total = next(values)
        for v in values:
            total = total + v
        return {"total": total, **terms}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy against class indices or class probabilities (timm's
    ``mixup_target`` smoothing for the latter), in float32."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def target_class(labels: torch.Tensor) -> torch.Tensor:
    """One class per row: the label, or the most probable class of a mixed label."""
    return labels if labels.ndim == 1 else labels.argmax(dim=1)


def generation_block(channels: int) -> torch.nn.Sequential:
    """conv3x3 - ReLU - conv3x3 at ``channels`` (MGD's and ViTKD's generator of the teacher's map)."""
    return torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(channels, channels, 3, padding=1))


def width_map(c_in: int, c_out: int) -> torch.nn.Module:
    """A per-token linear map (1x1 convolution) from ``c_in`` to ``c_out`` channels; the identity
    when the widths are equal."""
    return torch.nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else torch.nn.Identity()


def non_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B, K - 1): each row without its target class's column."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, target[:, None], False)
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def missing_layers(config: LossSettings, pairs: list) -> str | None:
    """:meth:`DistillLoss.check` of a method that reads teacher layers: the error when it has no pairs."""
    return None if pairs else f"loss.kind {config.kind!r} needs pairs: [[student_layer, teacher_layer], ...]"


def teacher_logits(teacher: TeacherTargets, kind: str) -> torch.Tensor:
    """The teacher's logits as float32 constants, or a clear error when the batch has none."""
    if teacher.logits is None:
        raise ValueError(f"loss kind {kind!r} needs the teacher's logits")
    return teacher.logits.detach().float()


def teacher_layers(teacher: TeacherTargets, student: StudentOutputs, kind: str) -> list[torch.Tensor]:
    """The teacher's paired layers as float32 constants, one per student map, or a clear error."""
    if not student.features or len(teacher.layers) != len(student.features):
        raise ValueError(f"loss kind {kind!r} needs one teacher layer per student feature map "
                         f"({len(teacher.layers)} for {len(student.features)})")
    return [t.detach().float() for t in teacher.layers]
