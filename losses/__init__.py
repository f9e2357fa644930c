"""The loss registry: every distillation method a student can train with, by ``loss.kind``.

Each method is one class (:class:`losses.base.DistillLoss`) in a module of this package, registered
in :data:`REGISTRY` when the package loads (the list below).  The config schema takes the union of the registered
configs (:data:`LossConfig`, discriminated by ``kind``); the model plan, the loader and the trainer
ask :func:`needs`, :func:`check`, :func:`check_model` and :func:`build`.  Nothing else knows what a
kind means.  Adding a method: a module with its class (ARCHITECTURE.md shows FitNets as the worked example), its import
below, and its test against a float64 numpy reference.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag

from .base import DistillLoss, LayerPair, LossSettings, Needs, StudentOutputs, TeacherTargets

REGISTRY: dict[str, type[DistillLoss]] = {}


def register(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Make ``cls`` selectable by each of its ``kinds``; a kind may be registered once."""
    for kind in cls.kinds:
        if kind in REGISTRY:
            raise ValueError(f"loss kind {kind!r} is registered twice ({REGISTRY[kind].__name__}, {cls.__name__})")
        REGISTRY[kind] = cls
    return cls


from . import at, dist, distill_token, dkd, fitnets, logit_std, mgd, nkd, spectralkd, vitkd  # noqa: E402

# every method, in the order ``loss.kind`` lists them
for _method in (spectralkd.SpectralKD, dkd.DKD, dist.DIST, nkd.NKD, logit_std.LogitStd, fitnets.FitNets, at.AT,
                vitkd.ViTKD, mgd.MGD, distill_token.DistillToken):
    register(_method)

KINDS = tuple(REGISTRY)
DEFAULT = spectralkd.SpectralKDConfig()


def _kind_of(value) -> str | None:
    """The kind a ``loss:`` section names (the default's when it names none)."""
    if isinstance(value, dict):
        return value.get("kind", DEFAULT.kind)
    return getattr(value, "kind", None)


# a student's ``loss:`` section: the config of the class its ``kind`` names
LossConfig = Annotated[
    Union[tuple(Annotated[cls.Config, Tag(kind)] for kind, cls in REGISTRY.items())],  # type: ignore[misc]
    Discriminator(_kind_of, custom_error_type="loss_kind",
                  custom_error_message=f"loss.kind is one of {', '.join(KINDS)}"),
]


def loss_class(kind: str) -> type[DistillLoss]:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown loss kind {kind!r} ({' | '.join(KINDS)})") from None


def needs(config: LossSettings, pairs) -> Needs:
    """What a student with this loss config and these layer pairs reads of the teacher."""
    return loss_class(config.kind).needs(config, bool(pairs))


def check(config: LossSettings, pairs) -> str | None:
    """Why this loss config cannot train with these layer pairs (None: it can)."""
    return loss_class(config.kind).check(config, list(pairs))


def check_model(config: LossSettings, model) -> str | None:
    """Why this loss config cannot train the student ``model`` (built on the meta device; None: it can)."""
    return loss_class(config.kind).check_model(config, model)


def build(config: LossSettings, pairs: tuple[LayerPair, ...] = (), num_classes: int = 0) -> DistillLoss:
    """The loss module of ``config`` for these layer pairs (its extras sized from their shapes)."""
    return loss_class(config.kind)(config, tuple(pairs), num_classes)


__all__ = ["DEFAULT", "KINDS", "REGISTRY", "DistillLoss", "LayerPair", "LossConfig", "LossSettings", "Needs",
           "StudentOutputs", "TeacherTargets", "build", "check", "check_model", "loss_class", "needs", "register"]
