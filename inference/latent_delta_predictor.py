"""A trained latent-delta run behind the ``Predictor`` interface (torch).

The recipe, labels and modes are ``latent_delta_modes.py``'s (shared with the ONNX
predictor); this file loads the run and its count VAE and runs them in torch. The VAE is
the one the run was trained on: its weights must still hash to what the model card recorded,
because the run's latents mean nothing under another VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_delta import MODEL_CLASS, LatentDelta, LatentDeltaConfig

from .latent_delta_modes import MODES, LatentDeltaPredictorBase, latent_delta_settings
from .run_cards import _DAMAGED_FIX, load_model_card
from .run_inputs import refuse_fallbacks
from .trained_runs import load_weights, weights_path

__all__ = ["MODES", "LatentDeltaPredictor", "load_latent_delta", "load_predictor", "run_vae"]


def _config(card: dict, source: Path) -> LatentDeltaConfig:
    try:
        c = dict(card["config"])
        dit = dict(c.pop("dit"))
        dit["n_categories"] = tuple(dit["n_categories"])
        c["dit"] = DiTConfig(**dit)
        c["diffusion"] = DiffusionConfig(**c["diffusion"])
        c["predictor_hidden"] = tuple(c["predictor_hidden"])
        return LatentDeltaConfig(**c)
    except (KeyError, TypeError, ValueError) as err:
        raise DataValidationError(source, "config", f"invalid ({err})", _DAMAGED_FIX) from err


def load_latent_delta(run_dir: str | Path, weights: str = "auto"):
    """(the trained LatentDelta in eval mode, its model card, its weights file)."""
    card = load_model_card(run_dir, MODEL_CLASS)
    model = LatentDelta(_config(card, Path(run_dir) / "final" / "model_config.json"))
    path = weights_path(run_dir, weights)
    load_weights(model, path)
    return model.eval(), card, path


def run_vae(card: dict, source):
    """The count VAE (``VAEBridge``) the run was trained with, refused if its weights changed."""
    from .vae_bridge import VAEBridge

    recorded = card["vae"]
    run = recorded["vae_run"]
    if not (Path(run) / "final").exists():
        raise DataValidationError(
            source, "vae.run", f"the run's count VAE {run} is not there",
            "keep the VAE run where the latent-delta run was trained with it",
        )  # fmt: skip
    bridge = VAEBridge(run, "ema" if recorded["weights"].startswith("ema") else "model")
    if bridge.provenance["weights_sha256"] != recorded["weights_sha256"]:
        raise DataValidationError(
            source, "vae.weights_sha256", f"the VAE at {run} is not the one this run was trained "
            "with (its weights changed)", "predict with the VAE the run was trained on, or "
            "retrain the latent-delta run on this VAE",
        )  # fmt: skip
    return bridge


class LatentDeltaPredictor(LatentDeltaPredictorBase):
    """A finished ``latentcell train latent-delta`` run in mode "sampled" or "deterministic"."""

    def __init__(self, run_dir, mode=None, weights="auto", steps=None, guidance=None) -> None:
        self.model, self.card, self.weights = load_latent_delta(run_dir, weights)
        super().__init__(latent_delta_settings(self.card), self.card["genes"], mode, run_dir,
                         steps, guidance)  # fmt: skip
        self.bridge = run_vae(self.card, run_dir)

    @torch.no_grad()
    def _encode(self, counts, library) -> np.ndarray:
        x, lib = torch.from_numpy(counts), torch.from_numpy(library)
        return self.bridge.vae.encode(x, lib)[0].numpy()

    def _predict_mean(self, z_control, codes) -> np.ndarray:
        return self.model.predict_mean(torch.from_numpy(z_control), torch.from_numpy(codes)).numpy()

    def _sample(self, z_control, codes, noise, steps, guidance) -> np.ndarray:
        out = self.model.sample(torch.from_numpy(z_control), torch.from_numpy(codes),
                                torch.from_numpy(noise), steps, guidance)  # fmt: skip
        return out.numpy()

    def _decode_mean(self, z) -> np.ndarray:
        return self.bridge.decode_numpy(z)

    def _decode_sample(self, z, library, rng) -> np.ndarray:
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z, lib = torch.from_numpy(np.asarray(z, np.float32)), torch.from_numpy(library)
        with torch.no_grad():
            return self.bridge.vae.sample(z, lib, generator=g).numpy()


def load_predictor(run_dir: str | Path, options) -> LatentDeltaPredictor:
    """The latent-delta family's predictor (``families.registry``); ``options`` is a
    ``predict.PredictOptions`` (mode, weights, steps, guidance). ST's ``--unseen`` fallbacks
    do not exist here (no generic perturbation is learnt): refused."""
    refuse_fallbacks(run_dir, options, "a latent-delta run",
                     "it learns no generic perturbation; any cell type's controls work")  # fmt: skip
    return LatentDeltaPredictor(run_dir, options.mode, options.weights, options.steps,
                                options.guidance)  # fmt: skip
