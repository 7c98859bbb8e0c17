"""Perturbation latent diffusion (seeds 000 §2 and 001 §2.2): a perturbation as a move in the
count VAE's latent space, predicted as a mean and sampled as a distribution.

Training pairs (z_c, z_p, p): the VAE posterior means of a control cell and a perturbed cell
of perturbation p (paired within their cell type and batch: ``trainer/latent_delta_stage``).
The target x is the shift Δz = z_p - z_c (``target="delta"``, seed 000) or the perturbed
latent z_p itself (``target="absolute"``, seed 001), standardized with training statistics.
Two heads share nothing but the data:

- the delta predictor f(z_c, p) -> x, an MLP on [standardized z_c, embedding of p] trained
  with MSE (the deterministic mode: the conditional mean of x);
- a DiT over x conditioned on z_c (its d dimensions as continuous conditions, standardized)
  and on p (a categorical condition with a learned null), trained with the diffusion loss;
  p alone is dropped with probability ``cfg_dropout``, so guidance
  x̂ = x̂(∅) + w (x̂(p) - x̂(∅)) amplifies the perturbation and keeps the control.

    loss = mean ||f(z_c, p) - x||² + L_diffusion(x | z_c, p)

Prediction: z = z_c + x (delta) or z = x (absolute), x from f (deterministic) or from DDIM
with guidance (sampled); cells are then drawn from the VAE's likelihood at the control's
library size (``inference/latent_delta_modes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .diffusion import DiffusionConfig, guided, make_process
from .dit import DiT, DiTConfig

__all__ = ["MODEL_CLASS", "TARGETS", "LatentDelta", "LatentDeltaConfig", "LatentDeltaOutput"]

MODEL_CLASS = "latentcell.models.latent_delta.LatentDelta"
TARGETS = ("delta", "absolute")


@dataclass(frozen=True)
class LatentDeltaConfig:
    """n_latent: the VAE's latent size; n_perturbations: the store's perturbation labels (the
    control included, whose code is never a target). ``dit`` sizes the denoiser; its
    ``n_latent``, ``n_categories`` and ``n_continuous`` are filled in from the above."""

    n_latent: int
    n_perturbations: int
    target: str = "delta"
    predictor_hidden: tuple[int, ...] = (256, 256)
    embedding_dim: int = 32
    dit: DiTConfig | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cfg_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.n_latent < 1 or self.n_perturbations < 1 or self.embedding_dim < 1:
            raise ValueError("n_latent, n_perturbations and embedding_dim must be >= 1")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        base = self.dit or DiTConfig(n_latent=self.n_latent)
        dit = DiTConfig(
            n_latent=self.n_latent, patch_size=base.patch_size, hidden=base.hidden,
            depth=base.depth, heads=base.heads, mlp_ratio=base.mlp_ratio,
            n_categories=(self.n_perturbations,), n_continuous=self.n_latent,
            n_frequencies=base.n_frequencies,
        )  # fmt: skip
        object.__setattr__(self, "dit", dit)
        object.__setattr__(self, "predictor_hidden", tuple(int(h) for h in self.predictor_hidden))


@dataclass
class LatentDeltaOutput:
    loss: torch.Tensor
    n_cells: torch.Tensor
    predictor_loss: torch.Tensor
    diffusion_loss: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]:
        return {
            "loss": self.loss.detach(),
            "predictor_mse": self.predictor_loss.detach(),
            "diffusion_loss": self.diffusion_loss.detach(),
        }


class DeltaPredictor(nn.Module):
    """(standardized z_c (n, d), perturbation codes (n,)) -> standardized x (n, d). The last
    layer starts at zero: an untrained predictor says "the target's training mean"."""

    def __init__(self, n_latent: int, n_perturbations: int, embedding_dim: int, hidden) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_perturbations, embedding_dim)
        sizes = [n_latent + embedding_dim, *hidden, n_latent]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z_std: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([z_std, self.embedding(perturbation.long())], dim=-1))


class LatentDelta(nn.Module):
    """``forward(batch)``: the batch holds ``z_control``, ``z_perturbed`` (n, d) float32 and
    ``perturbation`` (n,) int64 (optional ``is_pad`` (n,) bool); returns the summed loss."""

    def __init__(self, config: LatentDeltaConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_latent
        self.predictor = DeltaPredictor(
            d, config.n_perturbations, config.embedding_dim, config.predictor_hidden
        )
        self.dit = DiT(config.dit)
        self.process = make_process(config.diffusion)
        # training statistics (``set_stats``), saved with the weights
        self.register_buffer("control_mean", torch.zeros(d))
        self.register_buffer("control_std", torch.ones(d))
        self.register_buffer("target_shift", torch.zeros(d))
        self.register_buffer("target_scale", torch.ones(()))

    def set_stats(self, control_mean, control_std, target_shift, target_scale: float) -> None:
        self.control_mean.copy_(torch.as_tensor(control_mean, dtype=torch.float32))
        self.control_std.copy_(torch.as_tensor(control_std, dtype=torch.float32).clamp_min(1e-6))
        self.target_shift.copy_(torch.as_tensor(target_shift, dtype=torch.float32))
        self.target_scale.fill_(float(target_scale))

    # -- scaling --------------------------------------------------------------------------

    def condition_values(self, z_control: torch.Tensor) -> torch.Tensor:
        """z_c standardized per dimension: the DiT's continuous conditions."""
        return (z_control.float() - self.control_mean) / self.control_std

    def target_of(self, z_control: torch.Tensor, z_perturbed: torch.Tensor) -> torch.Tensor:
        """x in the VAE's units: Δz or z_p."""
        return z_perturbed - z_control if self.config.target == "delta" else z_perturbed

    def scale_target(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.target_shift) * self.target_scale

    def unscale_target(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.target_scale + self.target_shift

    def latent_of(self, z_control: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The predicted perturbed latent from x in the VAE's units."""
        return z_control + x if self.config.target == "delta" else x

    def codes(self, perturbation: torch.Tensor) -> torch.Tensor:
        return perturbation.long().reshape(-1, 1)

    # -- training -------------------------------------------------------------------------

    def forward(self, batch, step: int | torch.Tensor = 0) -> LatentDeltaOutput:
        z_c, z_p = batch["z_control"].float(), batch["z_perturbed"].float()
        x0 = self.scale_target(self.target_of(z_c, z_p))
        values = self.condition_values(z_c)
        codes = self.codes(batch["perturbation"])
        predictor_per_cell = (self.predictor(values, batch["perturbation"]) - x0).pow(2).mean(1)
        if self.training and self.config.cfg_dropout > 0:
            drop = torch.rand(codes.shape, device=codes.device) < self.config.cfg_dropout
            codes = torch.where(drop, self.dit.null_codes.expand_as(codes), codes)
        generator = None
        if not self.training and "row" in batch and len(batch["row"]):
            generator = torch.Generator(x0.device).manual_seed(int(batch["row"][0]))
        diffusion_per_cell = self.process.training_loss(
            lambda x, t: self.dit(x, t, codes, values), x0, generator
        )
        keep = ~batch["is_pad"] if "is_pad" in batch else torch.ones_like(x0[:, 0], dtype=bool)
        n = keep.sum()
        denominator = n.clamp_min(1)
        predictor_loss = (predictor_per_cell * keep).sum() / denominator
        diffusion_loss = (diffusion_per_cell * keep).sum() / denominator
        return LatentDeltaOutput(predictor_loss + diffusion_loss, n, predictor_loss, diffusion_loss)

    # -- prediction -----------------------------------------------------------------------

    @torch.no_grad()
    def predict_mean(self, z_control: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """x (n, d) in the VAE's units from the delta predictor (the deterministic mode)."""
        out = self.predictor(self.condition_values(z_control), perturbation)
        return self.unscale_target(out)

    @torch.no_grad()
    def sample(
        self,
        z_control: torch.Tensor,
        perturbation: torch.Tensor,
        noise: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """x (n, d) in the VAE's units by DDIM (or the flow solver) from ``noise`` (n, d),
        guided on the perturbation only: the unconditional pass keeps z_c."""
        d = self.config.diffusion
        steps = d.sample_steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        values = self.condition_values(z_control)
        codes = self.codes(perturbation)
        null = self.dit.null_codes.expand_as(codes).clone()
        was_training = self.training
        self.eval()
        try:
            denoise = guided(
                lambda x, t, c: self.dit(x, t, c[0], c[1]),
                (codes, values),
                (null, values),
                guidance,
            )
            x = self.process.sample(denoise, noise.float(), steps, d.eta)
        finally:
            self.train(was_training)
        return self.unscale_target(x)
