"""Optimizer groups and the warm-up + cosine schedule (pure functions, known answers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from latentcell.trainer.optim import build_optimizer, build_scheduler, lr_factor, warmup_length
from latentcell.trainer.sections import OptimConfig


def test_schedule_known_points():
    c = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c, 110) == pytest.approx(0.1)  # first step of warm-up
    assert lr_factor(9, c, 110) == pytest.approx(1.0)  # warm-up done
    assert lr_factor(10, c, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(60, c, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_factor(110, c, 110) == pytest.approx(0.1)  # floor
    assert lr_factor(500, c, 110) == pytest.approx(0.1)  # stays at the floor
    flat = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert lr_factor(0, flat, 10) == lr_factor(9, flat, 10) == 1.0


def test_scheduler_follows_lr_factor():
    c = OptimConfig(lr=0.5, warmup_steps=3, min_lr_ratio=0.0, max_warmup_fraction=1.0)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, c)
    sched = build_scheduler(opt, c, max_steps=13)
    seen = []
    for _ in range(13):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, c, 13) for s in range(13)])
    assert seen[8] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_a_short_run_ends_its_warm_up_early_and_decays():
    """The default warm-up (100 steps) in a 60-step run: capped at 10% of the run (6 steps),
    so the peak comes early and the run ends at the floor, not mid-warm-up."""
    c = OptimConfig(lr=1.0, min_lr_ratio=0.1)
    assert warmup_length(c, 60) == 6
    assert lr_factor(5, c, 60) == pytest.approx(1.0)
    assert lr_factor(60, c, 60) == pytest.approx(0.1)
    assert max(lr_factor(s, c, 60) for s in range(60)) == pytest.approx(1.0)
    assert warmup_length(c, 5000) == 100  # a long run keeps its configured warm-up
    assert warmup_length(OptimConfig(warmup_steps=100, max_warmup_fraction=1.0), 60) == 60
    assert warmup_length(OptimConfig(warmup_steps=0), 60) == 0
    assert warmup_length(c, 3) == 1
    with pytest.raises(ValueError, match="max_warmup_fraction"):
        OptimConfig(max_warmup_fraction=0.0)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_parameter("dispersion", nn.Parameter(torch.zeros(3)))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert [p.shape for p in by_decay[0.1]] == [torch.Size([3, 4])]
    assert len(by_decay[0.0]) == 4  # linear bias, norm weight + bias, dispersion


def test_decay_is_applied():
    # With zero gradients, AdamW's decoupled decay alone shrinks a matrix by lr * wd.
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    opt = build_optimizer(layer, OptimConfig(lr=0.1, weight_decay=0.5))
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt.step()
    torch.testing.assert_close(layer.weight, torch.full((2, 2), 1.0 - 0.1 * 0.5))
