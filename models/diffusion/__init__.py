"""Diffusion objectives and samplers for latent generative models.

Two processes behind one interface, ``training_loss(denoise, x0)`` and
``sample(denoise, noise, steps)``, where ``denoise(x_t, t)`` takes time in [0, 1]:

- ``GaussianDiffusion``: DDPM training with epsilon or v prediction on a linear or cosine
  schedule, DDIM sampling with any number of steps;
- ``FlowMatching``: linear interpolant, velocity prediction, Euler or Heun ODE sampling.

Classifier-free guidance (``guidance.guided``) wraps any conditional denoiser into such a
``denoise`` with the conditional and unconditional passes batched together.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flow import SOLVERS, FlowMatching
from .gaussian import PREDICTIONS, GaussianDiffusion
from .guidance import guided, stack_conditions
from .schedules import SCHEDULES, make_alphas_cumprod

__all__ = [
    "DiffusionConfig",
    "FlowMatching",
    "GaussianDiffusion",
    "guided",
    "make_alphas_cumprod",
    "make_process",
    "stack_conditions",
]

OBJECTIVES = ("ddpm", "flow")


@dataclass(frozen=True)
class DiffusionConfig:
    """objective: "ddpm" (with ``prediction`` eps|v on ``schedule`` over ``n_train_steps``)
    or "flow" (velocity, integrated with ``solver``). ``sample_steps`` and ``guidance`` are
    the defaults ``latentcell generate`` uses; ``eta`` > 0 makes DDIM stochastic."""

    objective: str = "ddpm"
    prediction: str = "v"
    schedule: str = "cosine"
    n_train_steps: int = 1000
    solver: str = "heun"
    sample_steps: int = 50
    guidance: float = 1.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}")
        if self.n_train_steps < 2 or self.sample_steps < 1 or self.eta < 0:
            raise ValueError("n_train_steps must be >= 2, sample_steps >= 1, eta >= 0")


def make_process(config: DiffusionConfig) -> GaussianDiffusion | FlowMatching:
    if config.objective == "flow":
        return FlowMatching(config.solver)
    return GaussianDiffusion(config.schedule, config.n_train_steps, config.prediction)
