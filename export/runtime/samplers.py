"""DDIM and flow-matching samplers with classifier-free guidance, in numpy.

The torch samplers (``models/diffusion``) rewritten for arrays, step for step in float32, so
that with the same starting noise the two give the same latents (tested within 1e-4). The
schedule is not recomputed: the bundle carries ``alphas_cumprod`` as trained.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ddim", "ddim_timesteps", "flow", "guided"]

# (x_t (n, d), model time (n,) in [0, 1]) -> network output (n, d)
Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def guided(denoise: Callable, cond: dict, null: dict, scale: float) -> Denoiser:
    """``uncond + scale * (cond - uncond)`` with both passes in one call of 2n rows;
    ``denoise(x, t, condition)`` takes a dict of condition arrays. Scale 1 runs one pass."""
    if scale == 1.0 or not cond:
        return lambda x, t: denoise(x, t, cond)
    both = {k: np.concatenate([cond[k], null[k]]) for k in cond}

    def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = denoise(np.concatenate([x, x]), np.concatenate([t, t]), both)
        conditional, unconditional = out[: len(x)], out[len(x) :]
        return unconditional + np.float32(scale) * (conditional - unconditional)

    return run


def ddim_timesteps(n_train_steps: int, steps: int) -> np.ndarray:
    """``steps`` training timesteps from the noisiest to the cleanest (DDIM's tau)."""
    if not 1 <= steps <= n_train_steps:
        raise ValueError(f"steps must be in [1, {n_train_steps}], got {steps}")
    taus = np.unique(np.linspace(0, n_train_steps - 1, steps).round().astype(int))
    return taus[::-1].copy()


def ddim(
    denoise: Denoiser,
    noise: np.ndarray,
    alphas_cumprod: np.ndarray,
    prediction: str,
    steps: int,
    eta: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """DDIM from ``noise`` at the last timestep down to x_0 (eps or v prediction);
    ``eta`` > 0 adds DDPM-like noise drawn from ``rng``."""
    x = noise.astype(np.float32)
    n_train = len(alphas_cumprod)
    taus = ddim_timesteps(n_train, steps)
    one = np.float32(1.0)
    for i, tau in enumerate(taus):
        a = np.float32(alphas_cumprod[tau])
        a_prev = np.float32(alphas_cumprod[taus[i + 1]]) if i + 1 < len(taus) else one
        t = np.full(len(x), tau, dtype=np.float32) / np.float32(n_train)
        out = denoise(x, t).astype(np.float32)
        if prediction == "eps":
            eps = out
            x0 = (x - np.sqrt(one - a) * eps) / np.sqrt(a)
        else:  # v
            x0 = np.sqrt(a) * x - np.sqrt(one - a) * out
            eps = np.sqrt(one - a) * x + np.sqrt(a) * out
        var = max((one - a_prev) / (one - a) * (one - a / a_prev), np.float32(0.0))
        sigma = np.float32(eta) * np.sqrt(np.float32(var))
        x = np.sqrt(a_prev) * x0 + np.sqrt(max(one - a_prev - sigma**2, np.float32(0))) * eps
        if eta > 0 and i + 1 < len(taus):
            x = x + sigma * rng.standard_normal(x.shape).astype(np.float32)
    return x


def flow(denoise: Denoiser, noise: np.ndarray, steps: int, solver: str = "heun") -> np.ndarray:
    """Integrate dx/dt = v from t=1 (``noise``) to t=0 in ``steps`` equal steps (Euler, or
    Heun: two evaluations per step but the last)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise.astype(np.float32)
    times = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    for i in range(steps):
        t0, t1 = times[i], times[i + 1]
        dt = np.float32(t1 - t0)
        v0 = denoise(x, np.full(len(x), t0, dtype=np.float32))
        x_next = x + dt * v0
        if solver == "heun" and i + 1 < steps:
            v1 = denoise(x_next, np.full(len(x), t1, dtype=np.float32))
            x_next = x + dt * np.float32(0.5) * (v0 + v1)
        x = x_next
    return x
