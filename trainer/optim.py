"""AdamW with weight decay where it belongs, and a warm-up + cosine learning-rate schedule.

Decay applies to weight matrices only: decaying biases, normalization gains or per-gene
dispersions (all 1-D) only pulls them toward values that mean nothing for them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sections import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "warmup_length"]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for all parameters. On a CPU the default (a loop over parameters) took
    # 3.6 ms per step for an 0.85M-parameter ST, fused 0.6 ms: 6% of the whole training step.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=fused or None,
    )


def warmup_length(config: OptimConfig, max_steps: int) -> int:
    """``warmup_steps``, capped at ``max_warmup_fraction`` of the run (at least one step)."""
    if config.warmup_steps <= 0:
        return 0
    cap = max(1, math.floor(config.max_warmup_fraction * max_steps))
    return min(config.warmup_steps, cap)


def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (a pure function, tested)."""
    warmup = warmup_length(config, max_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, max_steps)
    )
