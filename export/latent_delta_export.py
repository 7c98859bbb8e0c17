"""ONNX export of a latent-delta run (perturbation latent diffusion): the delta predictor,
the conditional denoiser and the count VAE it works in, plus the "latent_delta" metadata
section the torch-free runtime predicts from (``OnnxLatentDeltaPredictor``).

The graphs hold the networks only; the standardization of z_c and of the target, the DDIM
schedule and the guidance are small arrays and numbers in the metadata, applied in numpy by
the runtime exactly as ``models/latent_delta.py`` applies them in torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from latentcell.inference.latent_delta_modes import latent_delta_settings
from latentcell.models.latent_delta import LatentDelta

from .exporters import ExportPlan, _vae_section, run_genes
from .graphs import DenoiserGraph, ExportGraph, VAEDecoderGraph, VAEEncoderGraph

__all__ = ["DeltaPredictorGraph", "plan_latent_delta"]

KIND = "latent-delta"


class DeltaPredictorGraph(ExportGraph):
    """z_control (n, d) float32, perturbation (n,) int64 -> delta (n, d): the deterministic
    mode's x in the VAE's units (Δz, or z_p for the absolute target), standardization inside."""

    input_names = ("z_control", "perturbation")
    output_names = ("delta",)

    def __init__(self, model: LatentDelta) -> None:
        super().__init__()
        self.model = model

    def example(self):
        return (torch.zeros(2, self.model.config.n_latent), torch.zeros(2, dtype=torch.long))

    def forward(self, z_control, perturbation):
        return self.model.unscale_target(
            self.model.predictor(self.model.condition_values(z_control), perturbation)
        )


def _floats(tensor: torch.Tensor) -> list[float]:
    return [float(x) for x in tensor.reshape(-1)]


def plan_latent_delta(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    """The latent-delta family's exporter (``families.registry``): the four graphs, the genes
    and the "latent_delta" section (``latent_delta_settings`` plus the statistics)."""
    from latentcell.inference.latent_delta_predictor import load_latent_delta, run_vae

    model, card, path = load_latent_delta(run_dir, weights)
    bridge = run_vae(card, run_dir)
    diffusion = dataclasses.asdict(model.config.diffusion)
    if model.config.diffusion.objective == "ddpm":
        diffusion["alphas_cumprod"] = _floats(model.process.alphas_cumprod)
    section = latent_delta_settings(card) | {
        "diffusion": diffusion,
        "control_mean": _floats(model.control_mean),
        "control_std": _floats(model.control_std),
        "target_shift": _floats(model.target_shift),
        "target_scale": float(model.target_scale),
        "null_code": int(model.dit.null_codes[0]),
    }
    components = {
        "delta_predictor": DeltaPredictorGraph(model),
        "denoiser": DenoiserGraph(model.dit),
        "vae_encoder": VAEEncoderGraph(bridge.vae),
        "vae_decoder": VAEDecoderGraph(bridge.vae),
    }
    sections = {
        "genes": run_genes(card),
        "vae": _vae_section(bridge.vae, bridge.provenance, None, []),
        "latent_delta": section,
    }
    return ExportPlan(KIND, components, sections, path)
