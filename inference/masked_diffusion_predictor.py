"""A trained masked-diffusion run behind the ``Predictor`` interface (torch). The sampler,
labels and refusals are ``masked_diffusion_sampling.py``'s (shared with the ONNX predictor);
this file loads the run and runs its two networks in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.masked_diffusion import MODEL_CLASS, MaskedDiffusion, MaskedDiffusionConfig

from .masked_diffusion_sampling import MaskedDiffusionPredictorBase, masked_diffusion_settings
from .run_cards import _DAMAGED_FIX, load_model_card
from .run_inputs import refuse_fallbacks
from .trained_runs import load_weights, weights_path

__all__ = [
    "MaskedDiffusionPredictor",
    "ModelSampler",
    "load_masked_diffusion",
    "load_predictor",
    "model_settings",
]


def load_masked_diffusion(run_dir: str | Path, weights: str = "auto"):
    """(the trained MaskedDiffusion in eval mode, its model card, its weights file)."""
    card = load_model_card(run_dir, MODEL_CLASS)
    try:
        config = MaskedDiffusionConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as err:
        source = Path(run_dir) / "final" / "model_config.json"
        raise DataValidationError(source, "config", f"invalid ({err})", _DAMAGED_FIX) from err
    model = MaskedDiffusion(config)
    path = weights_path(run_dir, weights)
    load_weights(model, path)
    return model.eval(), card, path


def model_settings(model: MaskedDiffusion, set_size: int, control_label: str) -> dict:
    """Sampling settings of an in-memory model that no run describes (tests, benchmarks):
    every label but the control counts as trained; the columns are the VCC defaults."""
    c = model.config
    labels = list(c.perturbation_labels)
    return {
        "labels": labels, "control_label": control_label,
        "trained": [x for x in labels if x != control_label],
        "columns": {"perturbation": "target_gene", "cell_type": "cell_type", "batch": None},
        "n_bins": c.n_bins, "edges": model.edges.tolist(), "set_size": set_size,
        "null_code": c.null_code, "sample_steps": c.sample_steps, "guidance": c.guidance,
        "order": c.sample_order,
    }  # fmt: skip


class ModelSampler(MaskedDiffusionPredictorBase):
    """The sampler on a MaskedDiffusion module in torch (``genes``: its genes' names)."""

    def __init__(self, model, settings, genes, source, steps=None, guidance=None) -> None:
        super().__init__(settings, genes, source, steps, guidance)
        self.model = model.eval()

    @torch.no_grad()
    def _encode_controls(self, control: np.ndarray) -> np.ndarray:
        return self.model.encode_controls(torch.from_numpy(control)).numpy()

    @torch.no_grad()
    def _logits(self, tokens, control_bins, memory, codes) -> np.ndarray:
        arrays = (tokens, control_bins, memory, codes)
        return self.model.logits(*(torch.from_numpy(a) for a in arrays)).numpy()


class MaskedDiffusionPredictor(ModelSampler):
    """A finished ``latentcell train masked-diffusion`` run."""

    def __init__(self, run_dir, weights="auto", steps=None, guidance=None) -> None:
        model, self.card, self.weights = load_masked_diffusion(run_dir, weights)
        super().__init__(model, masked_diffusion_settings(self.card), self.card["genes"],
                         run_dir, steps, guidance)  # fmt: skip


def load_predictor(run_dir: str | Path, options) -> MaskedDiffusionPredictor:
    """The masked-diffusion family's predictor (``families.registry``); ``options`` is a
    ``predict.PredictOptions`` (weights, steps, guidance). ST's ``--unseen`` fallbacks do not
    exist here: refused."""
    refuse_fallbacks(run_dir, options, "a masked-diffusion run",
                     "it learns no generic perturbation; any cell type's control set works")  # fmt: skip
    return MaskedDiffusionPredictor(run_dir, options.weights, options.steps, options.guidance)
