"""The registry's losses as ``nn.Module``s for a training loop of one's own (``losses/``).

``loss(kind, **fields)`` makes any registered method; ``student_loss(config, name, model, cache)``
makes a configured student's, its trainable extras sized as the pipeline's trainer sizes them.
A loss is called as ``loss(StudentOutputs(logits, features), TeacherTargets(logits, layers), labels)``
and returns ``{"total": ..., <term>: ...}``; ``loss.reads`` says what it reads of the teacher (the
logits, the paired layers as 'spectra' or 'features', pooled to the student's width or not).
"""

from __future__ import annotations

import torch

import losses
from cache.reader import Cache
from losses import DistillLoss, LayerPair
from pipeline.config import PipelineConfig


def loss(kind: str = "spectral", pairs: tuple[LayerPair, ...] = (), num_classes: int = 0, **fields) -> DistillLoss:
    """The registered method ``kind`` with these config ``fields`` (its defaults for the rest);
    ``pairs`` size its extras (a method with a regressor needs the maps' shapes)."""
    cls = losses.loss_class(kind)
    return losses.build(cls.Config(kind=kind, **fields), pairs, num_classes)


def student_loss(config: PipelineConfig, name: str, model: torch.nn.Module, cache: Cache) -> DistillLoss:
    """Student ``name``'s loss for its timm ``model``: the config's loss section, its layer pairs with
    the student's and the cached teacher's shapes, ``model`` set up for it (a distillation token's
    second head).  The pipeline's trainer builds the same module."""
    from stages.pairs import feature_shapes, shaped_pairs

    from .api import layer_pairs

    st = config.student(name)
    needs = losses.needs(st.loss, st.pairs)
    pairs = layer_pairs(config, name) if needs.reads_layers else ()
    shapes = feature_shapes(model, [s for s, _ in pairs], config.data.image_size)
    fn = losses.build(st.loss, shaped_pairs(pairs, shapes, cache, needs, name), config.data.num_classes)
    fn.prepare(model)
    return fn
