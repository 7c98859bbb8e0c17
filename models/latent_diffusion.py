"""The DiT trained on VAE latents: scaling, condition dropout, the loss, and sampling.

Latents are standardized before diffusion, ``(z - shift) * scale`` with ``shift`` the
per-dimension mean and ``scale`` one over the overall standard deviation of the centred
latents, both computed from the training latents and kept as buffers so they travel with
the weights. The module consumes the latent loader's batch dict::

    X        (n, d) float32 VAE posterior means
    obs      {key: (n,) int64} codes of the categorical conditions
    numeric  {key: (n,)} values of the continuous conditions
    is_pad   (n,) bool
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .diffusion import DiffusionConfig, guided, make_process
from .dit import DiT, DiTConfig

__all__ = ["DiffusionOutput", "LatentDiffusion", "LatentDiffusionConfig"]


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """categorical_keys / continuous_keys: the batch keys of each condition, in the order of
    ``dit.n_categories`` / the DiT's continuous inputs. Continuous values are standardized
    with ``continuous_mean`` / ``continuous_std`` (from training data) before embedding.
    cfg_dropout: probability that a training cell sees no condition at all (the null
    embeddings), which trains the unconditional model classifier-free guidance needs."""

    dit: DiTConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    categorical_keys: tuple[str, ...] = ()
    continuous_keys: tuple[str, ...] = ()
    continuous_mean: tuple[float, ...] = ()
    continuous_std: tuple[float, ...] = ()
    cfg_dropout: float = 0.1

    def __post_init__(self) -> None:
        if len(self.categorical_keys) != len(self.dit.n_categories):
            raise ValueError("categorical_keys must match dit.n_categories")
        m = len(self.continuous_keys)
        if not m == self.dit.n_continuous == len(self.continuous_mean) == len(self.continuous_std):
            raise ValueError("continuous_keys, their mean/std and dit.n_continuous must match")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


@dataclass
class DiffusionOutput:
    loss: torch.Tensor
    n_cells: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]:
        return {"loss": self.loss.detach()}


class LatentDiffusion(nn.Module):
    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.dit = DiT(config.dit)
        self.process = make_process(config.diffusion)
        d = config.dit.n_latent
        self.register_buffer("latent_shift", torch.zeros(d))
        self.register_buffer("latent_scale", torch.ones(()))
        # Constants from the config (not state): no zero-size tensors in the state dict.
        self.register_buffer(
            "continuous_mean", torch.tensor(config.continuous_mean).float(), persistent=False
        )
        self.register_buffer(
            "continuous_std", torch.tensor(config.continuous_std).float(), persistent=False
        )

    def set_latent_stats(self, shift: torch.Tensor, scale: float) -> None:
        self.latent_shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
        self.latent_scale.fill_(float(scale))

    # -- conditions ---------------------------------------------------------------------------

    def conditions_from_batch(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, standardized values) for a loader batch."""
        x = batch["X"]
        n = x.shape[0]
        codes, values = self.dit.null_condition(n, x.device)
        for k, key in enumerate(self.config.categorical_keys):
            given = batch["obs"][key].long()
            codes[:, k] = torch.where(given < 0, codes[:, k], given)  # missing label -> null
        for k, key in enumerate(self.config.continuous_keys):
            values[:, k] = batch["numeric"][key].float()
        return codes, self.standardize(values)

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.continuous_mean) / self.continuous_std

    def _drop_conditions(self, codes, values, generator=None):
        n = codes.shape[0]
        p = self.config.cfg_dropout
        if p == 0.0 or not self.training:
            return codes, values
        drop = torch.rand((n, 1), device=codes.device, generator=generator) < p
        null_codes, null_values = self.dit.null_condition(n, codes.device)
        return torch.where(drop, null_codes, codes), torch.where(drop, null_values, values)

    # -- training -----------------------------------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift) * self.latent_scale

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.latent_scale + self.latent_shift

    def forward(self, batch: Mapping, step: int | torch.Tensor = 0) -> DiffusionOutput:
        x0 = self.scale_latents(batch["X"].float())
        codes, values = self._drop_conditions(*self.conditions_from_batch(batch))
        generator = None
        if not self.training and "row" in batch and len(batch["row"]):
            # Validation draws the same times and noise for a cell at every evaluation, so
            # the curve moves only when the model does (and the global RNG is untouched).
            generator = torch.Generator(x0.device).manual_seed(int(batch["row"][0]))
        per_cell = self.process.training_loss(
            lambda x, t: self.dit(x, t, codes, values), x0, generator
        )
        keep = ~batch["is_pad"] if "is_pad" in batch else torch.ones_like(per_cell, dtype=bool)
        n_cells = keep.sum()
        loss = (per_cell * keep).sum() / n_cells.clamp_min(1)
        return DiffusionOutput(loss=loss, n_cells=n_cells)

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        codes: torch.Tensor,
        values: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Latents (in the VAE's units) for each row of (codes, standardized values).

        A row whose codes are all null is sampled unconditionally whatever ``guidance``.
        """
        d = self.config.diffusion
        steps = d.sample_steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        n = codes.shape[0]
        device = self.latent_shift.device
        if noise is None:
            noise = torch.randn((n, self.config.dit.n_latent), generator=generator, device=device)
        was_training = self.training
        self.eval()
        try:
            null = self.dit.null_condition(n, device)
            denoise = guided(
                lambda x, t, c: self.dit(x, t, c[0], c[1]),
                (codes.to(device), values.to(device)),
                null,
                guidance,
            )
            x = self.process.sample(denoise, noise, steps, d.eta, generator)
        finally:
            self.train(was_training)
        return self.unscale_latents(x)
