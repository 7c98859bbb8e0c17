"""DDPM training (epsilon or v prediction) and DDIM sampling with any number of steps.

Time reaches the network as ``t / n_train_steps`` in [0, 1), the same scale flow matching
uses, so one denoiser architecture serves both objectives.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .schedules import make_alphas_cumprod

PREDICTIONS = ("eps", "v")


class GaussianDiffusion:
    """The forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` and its reverse."""

    def __init__(self, schedule: str = "cosine", n_train_steps: int = 1000, prediction="eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.n_train_steps = n_train_steps
        self.prediction = prediction
        self.alphas_cumprod = make_alphas_cumprod(schedule, n_train_steps)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.n_train_steps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        a = self._alpha(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022)

    def split_prediction(self, x_t: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
        """(x0, eps) implied by the network output at signal level ``a``."""
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x_t + a.sqrt() * out
        return x0, eps

    def training_loss(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample mean squared error of the prediction at uniformly drawn timesteps."""
        n = x0.shape[0]
        t = torch.randint(0, self.n_train_steps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        out = denoise(self.q_sample(x0, t, noise), self.model_time(t))
        return (out.float() - self.target(x0, t, noise).float()).pow(2).flatten(1).mean(1)

    def timesteps(self, steps: int) -> np.ndarray:
        """``steps`` training timesteps from the noisiest to the cleanest (DDIM's tau)."""
        if not 1 <= steps <= self.n_train_steps:
            raise ValueError(f"steps must be in [1, {self.n_train_steps}], got {steps}")
        return np.unique(np.linspace(0, self.n_train_steps - 1, steps).round().astype(int))[
            ::-1
        ].copy()

    @torch.no_grad()
    def sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021) from ``noise`` at the last timestep down to x_0.

        ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's posterior variance.
        """
        x = noise
        taus = self.timesteps(steps)
        alphas = self.alphas_cumprod.to(x.device)
        for i, tau in enumerate(taus):
            t = torch.full((x.shape[0],), int(tau), device=x.device, dtype=torch.long)
            a = alphas[tau].to(x.dtype)
            a_prev = alphas[taus[i + 1]].to(x.dtype) if i + 1 < len(taus) else x.new_tensor(1.0)
            x0, eps = self.split_prediction(x, a, denoise(x, self.model_time(t)).to(x.dtype))
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < len(taus):
                x = x + sigma * torch.randn(
                    x.shape, device=x.device, dtype=x.dtype, generator=generator
                )
        return x
