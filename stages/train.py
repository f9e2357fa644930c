"""Training pieces shared by the teacher fit and the students: optimizer, schedule, evaluation."""

from __future__ import annotations

import math

import torch

from .models import intermediates, topk_correct


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, norms and tokens (1-d parameters), as timm does."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup from lr/100 to lr, then cosine to 0, stepped once per optimizer step."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


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
