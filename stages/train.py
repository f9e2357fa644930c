"""Training pieces shared by the teacher fit and the students: optimizer, schedule, evaluation,
checkpoints that resume or are set aside."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import PipelineError

from .models import intermediates, topk_correct

log = logging.getLogger("pipeline")


def optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's optimizer factory (``timm.optim.create_optimizer_v2``): ``name`` is any of
    ``timm.optim.list_optimizers()``; no weight decay on biases, norms and the model's
    ``no_weight_decay()`` tokens (pos_embed, cls_token), as the DeiT recipe trains."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay)


class StepSchedule:
    """timm's cosine schedule (``timm.scheduler.CosineLRScheduler``) stepped once per optimizer
    update: linear warmup from ``warmup_lr`` over ``warmup_steps``, then cosine from the base lr to
    ``min_lr`` over the remaining steps.  Its state is the step count, so a resume sets the same lr."""

    def __init__(self, opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float,
                 min_lr: float):
        from timm.scheduler import CosineLRScheduler

        self.opt, self.steps = opt, 0
        self.sched = CosineLRScheduler(opt, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                                       warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True,
                                       t_in_epochs=False)
        self.sched.step_update(0)

    def step(self) -> None:
        self.steps += 1
        self.sched.step_update(self.steps)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.sched.step_update(self.steps)


def schedule(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float | None,
             min_lr: float) -> StepSchedule:
    """The schedule of a run: ``warmup_lr`` None means lr / 100."""
    return StepSchedule(opt, total_steps, warmup_steps, lr / 100 if warmup_lr is None else warmup_lr, min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, autocast_ctx=None, layers: list[int] | None = None,
             on_layers=None) -> dict:
    """top-1 / top-5 (percent) and mean CE over (x, y) batches.  With ``layers``, the same forward
    pass also hands each batch's features of those layers (float32 numpy, NCHW) to ``on_layers``."""
    import contextlib

    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
            if layers:
                logits, feats = intermediates(model, x, layers)
                on_layers([f.float().cpu().numpy() for f in feats])
            else:
                logits = model(x)
        logits = logits.float()
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        a, b = topk_correct(logits, y)
        c1 += a
        c5 += b
        n += len(y)
    return {"top1": 100.0 * c1 / max(1, n), "top5": 100.0 * c5 / max(1, n), "loss": loss / max(1, n), "n": n}


def non_finite_parameter(model: torch.nn.Module) -> tuple[str | None, int]:
    """(the first parameter holding an inf or nan, how many do), or (None, 0) when all are finite."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    return (bad[0] if bad else None), len(bad)


def load_checkpoint(path: Path, what: str, parts: dict, needs: tuple[str, ...] = (),
                    restore: Callable[[dict], None] | None = None) -> dict | None:
    """The checkpoint at ``path`` loaded into ``parts`` (entry name -> an object with ``state_dict`` and
    ``load_state_dict``: model, optimizer, schedule), then ``restore(state)`` for its other entries
    (it raises on one that does not fit); returns the checkpoint's dict, or None without one.  The
    checkpoint must hold every entry of ``parts`` and ``needs``.  One that cannot be read or does
    not fit (truncated, emptied, garbage, another model's) is set aside beside it with a warning
    naming it, ``parts`` are left as they were, and None is returned: ``what`` trains from scratch."""
    if not path.exists():
        return None
    before = {k: copy.deepcopy(p.state_dict()) for k, p in parts.items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in (*parts, *needs) if not isinstance(state, dict) or k not in state]
        if missing:
            raise KeyError(f"no entry {missing[0]!r}")
        for k, p in parts.items():
            p.load_state_dict(state[k])
        if restore is not None:
            restore(state)
        return state
    except PermissionError as e:
        raise PipelineError(f"{path}: cannot read the checkpoint ({e.strerror}); make it readable or remove it") \
            from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch.load or load_state_dict raise
        for k, p in parts.items():
            p.load_state_dict(before[k])
        aside = set_aside(path)
        log.warning(f"{path}: unreadable checkpoint ({type(e).__name__}: {_first_line(e)}); set aside as "
                    f"{aside.name}, {what} trains from scratch")
        return None


def set_aside(path: Path) -> Path:
    """Rename ``path`` to the first free ``<name>.unreadable-<n>`` beside it (kept for inspection)."""
    n = 1
    while (aside := path.with_name(f"{path.name}.unreadable-{n}")).exists():
        n += 1
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another rank of the same run set it aside first
        pass
    except OSError as e:
        raise PipelineError(f"{path}: unreadable checkpoint, and it cannot be renamed to {aside.name} "
                            f"({e.strerror}); move it away") from None
    return aside


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"
