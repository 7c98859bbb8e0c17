"""Noise schedules for discrete-time diffusion: the cumulative signal level per timestep.

A schedule is fully described by ``alphas_cumprod`` (the fraction of signal variance left at
step t, decreasing from about 1 to about 0); every other quantity (betas, the v target, DDIM
updates) derives from it, so that is all this module produces.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_alphas_cumprod(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    """Ho et al. 2020: betas linear in t (the constants are for 1000 steps; scaled for others
    so that the total noise added stays the same)."""
    scale = 1000.0 / n_steps
    betas = torch.linspace(beta_start * scale, beta_end * scale, n_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_alphas_cumprod(n_steps: int, s: float = 0.008, max_beta: float = 0.999):
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped
    at ``max_beta`` so the last step stays invertible. Destroys signal more evenly than the
    linear schedule, which matters for low-dimensional data such as a VAE latent."""
    t = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(kind: str, n_steps: int) -> torch.Tensor:
    """``(n_steps,)`` float64 alpha_bar for timesteps 0 .. n_steps-1."""
    if n_steps < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {n_steps}")
    if kind == "linear":
        return linear_alphas_cumprod(n_steps)
    if kind == "cosine":
        return cosine_alphas_cumprod(n_steps)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
