"""A student's layer pairs: the shapes of both maps, the checks before training, and the widths
its cached teacher layers are pooled to at read time."""

from __future__ import annotations

import torch

import losses
from cache.reader import Cache
from pipeline.errors import PipelineError

from . import models


def feature_shapes(model, layers: list[int], size: int) -> list[tuple[int, ...]]:
    """The NCHW shapes of ``model``'s features at ``layers`` for one image (an eval-mode probe; the
    model's training flag is restored)."""
    if not layers:
        return []
    training = model.training
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        _, feats = models.intermediates(model.eval(), x, layers)
    model.train(training)
    return [tuple(int(d) for d in f.shape) for f in feats]


def check_pairs(pairs: tuple[losses.LayerPair, ...], needs: losses.Needs, who: str) -> None:
    """Fail before training when a student map cannot be compared with its teacher layer: the grids
    must match, and a loss that pools the teacher to the student's width needs a narrower student."""
    for p in pairs:
        where = f"layer pair {who} [{p.student}, {p.teacher}]"
        if p.student_shape[1:] != p.teacher_shape[1:]:
            raise PipelineError(f"{where}: student grid {p.student_shape[1]}x{p.student_shape[2]} does not match "
                                f"the teacher's {p.teacher_shape[1]}x{p.teacher_shape[2]}")
        if needs.pooled and p.student_shape[0] > p.teacher_shape[0]:
            raise PipelineError(f"{where}: student has {p.student_shape[0]} channels, more than the teacher's "
                                f"{p.teacher_shape[0]}: channel pooling only narrows")


def shaped_pairs(pairs, s_shapes: list[tuple[int, ...]], cache: Cache, needs: losses.Needs, who: str,
                t_shapes: list[tuple[int, ...]] | None = None) -> tuple[losses.LayerPair, ...]:
    """(student layer, teacher layer) pairs with both maps' (C, H, W): the student's from its NCHW
    probe ``s_shapes``, the teacher's as the loss receives it, from ``t_shapes`` (an online
    teacher's probe) or else the cache (its stored width; stored features keep the teacher's).  A
    pooled cache serves only its width (:meth:`cache.reader.Cache.require_width`)."""
    out = []
    for i, ((s, t), s_shape) in enumerate(zip(pairs, s_shapes)):
        if t_shapes is None:
            cache.require_width(t, s_shape[1], f"layer pair {who} [{s}, {t}]")
            layer = cache.layer(t)
            wide = needs.form == "features" and "features" in cache.spec.store
            t_shape = (layer.channels if wide else layer.stored_channels, layer.height, layer.width)
        else:
            t_shape = tuple(t_shapes[i][1:])
        out.append(losses.LayerPair(s, t, tuple(s_shape[1:]), tuple(t_shape)))
    return tuple(out)


def target_widths(pairs: tuple[losses.LayerPair, ...]) -> dict[int, int]:
    """Teacher layer -> the student width its cached layer is pooled to once at read time
    (layers paired with students of several widths are left at the stored width)."""
    widths: dict[int, set[int]] = {}
    for p in pairs:
        widths.setdefault(p.teacher, set()).add(p.student_shape[0])
    return {t: w.pop() for t, w in widths.items() if len(w) == 1}
