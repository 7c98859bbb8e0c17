"""Predict perturbed cells with perturbation latent diffusion, in numpy: what the torch
predictor (``latent_delta_predictor.py``) and the ONNX one
(``export/runtime/latent_delta_predict.py``) share. Plain numpy (no torch), so the torch-free
runtime imports it too; the two differ only in how they run the networks, so they refuse
the same labels and draw the same noise (a torch and an ONNX prediction of one seed agree
up to float error).

For log1p controls (n, G) of one cell type and a perturbation p:

1. z_c: the VAE's posterior means of the controls (``expm1`` of the log1p at library 1e4,
   the exact inverse of the encoder's normalization);
2. x: ``deterministic``: the delta predictor f(z_c, p); ``sampled``: DDIM over x from
   standard normal noise (drawn from ``rng``; seed 0 when none is given), ``steps`` steps,
   guidance ``guidance`` on the perturbation (the run's defaults when None);
3. z = z_c + x (target ``delta``) or x (``absolute``), decoded by the VAE: cells drawn from
   its likelihood at the controls' library sizes when ``library`` and ``rng`` are given,
   else its mean on the log1p scale.

The settings are a dict built from the run's model card by ``latent_delta_settings``; the
exporter writes the same dict (plus the statistics the graphs leave out) as the bundle's
"latent_delta" section.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression import TARGET_SUM, log1p_normalize

from .run_inputs import TrainedLabels, checked_controls

__all__ = ["MODES", "LatentDeltaPredictorBase", "latent_delta_settings"]

MODES = ("sampled", "deterministic")  # the first is the default (families.registry)


def latent_delta_settings(card: dict) -> dict:
    """What predicting needs from a run's model card (the bundle's "latent_delta" section)."""
    config, cats, roles = card["config"], card["categories"], card.get("roles", {})
    diffusion = config["diffusion"]
    return {
        "labels": list(cats["perturbation"]),
        "control_label": card["control_label"],
        "trained": list(card["trained_perturbations"]),
        "columns": {role: roles.get(role) for role in ("perturbation", "cell_type", "batch")},
        "target": config["target"],
        "n_latent": int(config["n_latent"]),
        "diffusion": dict(diffusion),
        "sample_steps": int(diffusion["sample_steps"]),
        "guidance": float(diffusion["guidance"]),
    }


class LatentDeltaPredictorBase(TrainedLabels):
    """Labels, modes and the prediction recipe; a subclass runs the networks:
    ``_encode(counts, library) -> z mean``, ``_predict_mean(z_c, codes) -> x``,
    ``_sample(z_c, codes, noise, steps, guidance) -> x`` (both x in the VAE's units),
    ``_decode_mean(z) -> mean log1p`` and ``_decode_sample(z, library, rng) -> counts``."""

    carried_by = "training pair"

    def __init__(self, settings: dict, genes, mode, source, steps=None, guidance=None) -> None:
        mode = MODES[0] if mode is None else mode
        if mode not in MODES:
            raise DataValidationError(
                source, "--mode", f"the latent-delta family has no mode {mode!r}",
                f"use {'|'.join(MODES)}",
            )  # fmt: skip
        if mode == "deterministic" and (steps is not None or guidance is not None):
            raise DataValidationError(
                source, "--steps/--guidance", "the deterministic mode does not sample",
                "drop them, or pass --mode sampled",
            )  # fmt: skip
        if steps is not None and steps < 1:
            raise DataValidationError(source, "--steps", f"got {steps}", "pass 1 or more steps")
        if guidance is not None and not np.isfinite(guidance):
            raise DataValidationError(source, "--guidance", f"got {guidance}", "pass a number")
        self.settings, self.genes, self.mode, self.source = settings, list(genes), mode, source
        self.steps = int(settings["sample_steps"] if steps is None else steps)
        self.guidance = float(settings["guidance"] if guidance is None else guidance)
        self.name = f"latent-{settings['target']}-{mode}"
        self.labels = list(settings["labels"])
        self.cell_types: list[str] = []  # z_c carries the cell type: any controls will do

    def _encode(self, counts, library) -> np.ndarray:
        raise NotImplementedError

    def _predict_mean(self, z_control, codes) -> np.ndarray:
        raise NotImplementedError

    def _sample(self, z_control, codes, noise, steps, guidance) -> np.ndarray:
        raise NotImplementedError

    def _decode_mean(self, z) -> np.ndarray:
        raise NotImplementedError

    def _decode_sample(self, z, library, rng) -> np.ndarray:
        raise NotImplementedError

    def latent(self, control: np.ndarray, perturbation: str, rng=None) -> np.ndarray:
        """The predicted perturbed latents (n, d) of log1p controls (steps 1-3 above)."""
        code = self._label_code(perturbation)  # refuses before any work
        counts = np.expm1(np.asarray(control, np.float32)).astype(np.float32)
        z_control = self._encode(counts, np.full(len(counts), TARGET_SUM, np.float32))
        codes = np.full(len(counts), code, np.int64)
        if self.mode == "deterministic":
            x = self._predict_mean(z_control, codes)
        else:
            rng = np.random.default_rng(0) if rng is None else rng
            noise = rng.standard_normal(z_control.shape).astype(np.float32)
            x = self._sample(z_control, codes, noise, self.steps, self.guidance)
        return z_control + x if self.settings["target"] == "delta" else x

    def predict(self, control, perturbation, cell_type, library=None, rng=None) -> np.ndarray:
        """Predicted log1p expression (n, G) for log1p controls (n, G) of one cell type."""
        control = checked_controls(control, self.genes, self.source)
        z = self.latent(control, perturbation, rng)
        if library is None or rng is None:
            return self._decode_mean(z)
        lib = np.asarray(library, dtype=np.float32)
        return log1p_normalize(self._decode_sample(z, lib, rng), lib)
