"""A trained conditional-VAE run (seed 003) behind the ``Predictor`` interface (torch).

Labels, codes and modes are ``cvae_modes.py``'s (shared with the ONNX predictor, so both
refuse the same labels and draw the same prior latents); this file only loads the run and
runs its encoder and decoder in torch (likelihood samples: ``CountVAE.sample``, seeded from
the caller's numpy generator). Mode "b" (default) re-decodes each control
under the perturbation; mode "a" decodes prior draws (see ``models/cvae.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.models.cvae import MODEL_CLASS, ConditionalVAE

from .cvae_modes import MODES, CVAEPredictorBase, cvae_settings
from .run_inputs import refuse_fallbacks
from .trained_runs import load_count_model

__all__ = ["MODES", "CVAEPredictor", "load_cvae", "load_predictor"]


def load_cvae(run_dir: str | Path, weights: str = "auto") -> tuple[ConditionalVAE, dict, Path]:
    """(the trained ConditionalVAE in eval mode, its model card, its weights file)."""
    return load_count_model(run_dir, weights, ConditionalVAE, MODEL_CLASS)


class CVAEPredictor(CVAEPredictorBase):
    """A finished ``latentcell train cvae`` run in mode "b" (default) or "a"."""

    def __init__(self, run_dir: str | Path, mode: str | None = None, weights: str = "auto"):
        self.model, self.card, self.weights = load_cvae(run_dir, weights)
        super().__init__(cvae_settings(self.card), self.card["genes"], mode, run_dir)

    @staticmethod
    def _tensors(codes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {role: torch.from_numpy(code) for role, code in codes.items()}

    @torch.no_grad()
    def _encode(self, counts, library, codes) -> np.ndarray:
        x, lib = torch.from_numpy(counts), torch.from_numpy(library)
        return self.model.encode_under(x, lib, self._tensors(codes))[0].numpy()

    @torch.no_grad()
    def _decode_mean(self, z, codes) -> np.ndarray:
        z = torch.from_numpy(np.asarray(z, np.float32))
        return self.model.mean_log1p(self.model.decode_under(z, self._tensors(codes))).numpy()

    def _decode_sample(self, z, library, codes, rng) -> np.ndarray:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z, lib = torch.from_numpy(np.asarray(z, np.float32)), torch.from_numpy(library)
        return self.model.sample_under(z, self._tensors(codes), lib, generator).numpy()


def load_predictor(run_dir: str | Path, options) -> CVAEPredictor:
    """The cvae family's predictor (``families.registry``); ``options`` is a
    ``predict.PredictOptions`` (``mode`` "b" | "a", None = "b"; ``weights``). The ``unseen``
    fallbacks are ST's: a CVAE learns no generic perturbation or unknown cell type, so it
    refuses them rather than ignore them."""
    refuse_fallbacks(run_dir, options, "a cvae run",
                     "it learns no generic perturbation or unknown cell type",
                     "; predict trained labels")  # fmt: skip
    return CVAEPredictor(run_dir, options.mode, options.weights)
