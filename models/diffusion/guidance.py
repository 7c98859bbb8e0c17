"""Classifier-free guidance: one batched forward for the conditional and unconditional passes.

``x`` and ``t`` are duplicated, the condition is stacked on top of its null version, the
network runs once on 2n rows, and the two halves are combined as
``uncond + scale * (cond - uncond)`` on every latent dimension. Scale 1 is the plain
conditional model, 0 the unconditional one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (x_t, t in [0, 1], condition) -> network output (eps, v or velocity, same shape as x_t)
Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def stack_conditions(cond, null):
    """Row-stack two conditions of the same structure (tensor, tuple or dict of tensors)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: stack_conditions(cond[k], null[k]) for k in cond}
    if isinstance(cond, tuple | list):
        return tuple(stack_conditions(c, u) for c, u in zip(cond, null, strict=True))
    return torch.cat([cond, null], dim=0)


def guided(denoise: Denoiser, cond, null_cond, scale: float) -> Denoiser:
    """A denoiser applying CFG with ``scale``; ``scale == 1`` skips the unconditional pass."""
    if scale == 1.0 or null_cond is None:
        return lambda x, t: denoise(x, t, cond)
    both = stack_conditions(cond, null_cond)

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoise(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), both)
        conditional, unconditional = out.chunk(2, dim=0)
        return unconditional + scale * (conditional - unconditional)

    return run
