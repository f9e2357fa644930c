"""Training pieces shared by the teacher fit and the students: optimizer, schedule, evaluation."""

from __future__ import annotations

import torch

from .models import intermediates, topk_correct


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
