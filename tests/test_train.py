"""The recipe's optimizer and schedule from timm: the lr of every step against the plain formula,
weight decay groups, resumes, and optimizer names checked against timm."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, config_from_dict
from stages.models import plan_models
from stages.train import optimizer, schedule
from tests.conftest import tiny_tree


def _lr(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Linear warmup from warmup_lr to lr over ``warmup`` steps, then a cosine to min_lr over the rest."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 300), warmup_frac=st.floats(0, 0.5), lr=st.floats(1e-5, 1e-1),
       warmup_lr=st.one_of(st.none(), st.floats(0, 1e-4)), min_lr=st.floats(0, 1e-5))
def test_schedule_sets_the_formulas_lr_at_every_step(total, warmup_frac, lr, warmup_lr, min_lr):
    warmup = int(warmup_frac * total)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = schedule(opt, total, warmup, lr, warmup_lr, min_lr)
    w0 = lr / 100 if warmup_lr is None else warmup_lr
    for step in range(total + 3):
        want = _lr(step, total, warmup, lr, w0, min_lr)
        assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-9, abs=1e-15), step
        sched.step()


def test_schedule_resumes_at_the_same_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    a = schedule(torch.optim.SGD([p], lr=0.1), 100, 10, 0.1, 1e-4, 1e-3)
    for _ in range(37):
        a.step()
    opt_b = torch.optim.SGD([p], lr=0.1)
    b = schedule(opt_b, 100, 10, 0.1, 1e-4, 1e-3)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr() and opt_b.param_groups[0]["lr"] == a.get_last_lr()[0]
    a.step(), b.step()
    assert b.get_last_lr() == a.get_last_lr()


def test_optimizer_decays_weights_but_not_biases_norms_or_tokens():
    m = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          num_classes=3)
    opt = optimizer(m, "adamw", 1e-3, 0.05)
    assert isinstance(opt, torch.optim.AdamW)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert decay_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert decay_of[id(named[name])] == 0.0, name
    assert len(decay_of) == len(named)  # every parameter in exactly one group
    assert isinstance(optimizer(m, "sgd", 1e-3, 0.0), torch.optim.SGD)


def test_unknown_optimizer_is_refused_naming_the_config_line():
    with pytest.raises(ConfigError, match=r"distill.students\[1\].optimizer: 'adamx'"):
        plan_models(config_from_dict(tiny_tree(**{"distill.students.1.optimizer": "adamx"})))
    with pytest.raises(ConfigError, match="teacher.fit.optimizer"):
        plan_models(config_from_dict(tiny_tree(**{"teacher.fit.optimizer": "nope"})))
    plan_models(config_from_dict(tiny_tree(**{"distill.defaults.optimizer": "lamb"})))  # a timm name passes
