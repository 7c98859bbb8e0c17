"""Predict perturbed cells with a conditional VAE (seed 003), in numpy: what the torch
predictor (``cvae_predictor.py``) and the ONNX one (``export/runtime/cvae_predict.py``)
share. Plain numpy (no torch), so the torch-free runtime imports it too.

Both are ``Predictor``s of ``predict.py`` (log1p controls of one cell type + a perturbation
label -> predicted log1p cells) and differ only in how they run the encoder and the decoder,
so the labels they refuse, the codes they condition on and the prior draws are the same
code, and a torch prediction and an ONNX one of the same seed agree up to float error in
their means (likelihood samples agree in distribution: each side draws with its own
library, torch's sampler or the runtime's ``likelihoods``).

- Mode "b" (default): each control, as counts at 1e4 (``expm1`` of its log1p, the exact
  inverse of the encoder's normalization), is encoded under the control label and its own
  cell type; its posterior mean is decoded under the perturbation and the same cell type.
- Mode "a": z ~ N(0, I) from ``rng`` (a generator of seed 0 when none is given, since the
  prior needs draws), decoded under the perturbation and the cell type; the controls give
  only how many cells and their library sizes.

With ``library`` and ``rng`` the predicted cells are drawn from the likelihood at the
controls' library sizes (NB/ZINB counts, or Gaussian log1p values mapped to counts) and
log1p-normalized; without them, the decoder's mean on the log1p scale. The batch (for a run
conditioned on it): control files carry no batch the run knows, so every prediction is made
in the run's most frequent training batch (``batch`` of the settings), encoder and decoder.

The settings are a dict built from the run's model card by ``cvae_settings``; the exporter
writes the same dict as the bundle's "cvae" section.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression import TARGET_SUM, log1p_normalize

from .run_inputs import TrainedLabels, checked_controls

__all__ = ["MODES", "CVAEPredictorBase", "cvae_settings"]

MODES = ("b", "a")  # the first is the default (families.registry's "cvae" modes)


def cvae_settings(card: dict) -> dict:
    """What predicting needs from a CVAE run's model card (the bundle's "cvae" section)."""
    config, cats, roles = card["config"], card["categories"], card.get("roles", {})
    conditions = list(card.get("conditions", ["perturbation"]))
    return {
        "labels": list(cats["perturbation"]),
        "control_label": card["control_label"],
        "trained": list(card.get("trained_perturbations") or cats["perturbation"]),
        "conditions": conditions,
        "columns": {role: roles.get(role) for role in ("perturbation", "cell_type", "batch")},
        "likelihood": config["likelihood"],
        "n_latent": int(config["n_latent"]),
        "cell_types": list(cats.get("cell_type", [])) if "cell_type" in conditions else [],
        "trained_cell_types": list(card.get("trained_cell_types") or cats.get("cell_type", [])),
        "batches": list(cats.get("batch", [])) if "batch" in conditions else [],
        "batch": card.get("default_batch") if "batch" in conditions else None,
    }


class CVAEPredictorBase(TrainedLabels):
    """Labels, codes and modes; a subclass runs the networks: ``_encode(counts, library,
    codes) -> z mean``, ``_decode_mean(z, codes) -> mean log1p (n, G)`` and
    ``_decode_sample(z, library, codes, rng) -> counts (n, G)`` drawn from the likelihood."""

    lacks = "the CVAE has no trained condition for it"
    control_is_label = True
    train_fix = ", or train a cvae run whose split trains on it"

    def __init__(self, settings: dict, genes: list[str], mode: str | None, source) -> None:
        mode = MODES[0] if mode is None else mode
        if mode not in MODES:
            raise DataValidationError(
                source, "--mode", f"the cvae family has no mode {mode!r}", f"use {'|'.join(MODES)}"
            )
        self.settings, self.genes, self.mode, self.source = settings, list(genes), mode, source
        self.name = f"cvae-{mode}"
        self.labels = list(settings["labels"])
        self.cell_types = list(settings["cell_types"])  # []: it ignores the controls' types

    def _codes(self, label: str, cell_type: str, n: int) -> dict[str, np.ndarray]:
        """{role: (n,) int64 code} of every condition of the run."""
        s = self.settings
        codes = {"perturbation": np.full(n, self._label_code(label), np.int64)}
        if "cell_type" in s["conditions"]:
            if cell_type not in self.cell_types or cell_type not in s["trained_cell_types"]:
                raise DataValidationError(
                    self.source, f"cell type {cell_type!r}",
                    "the run has no training cell of it, so the CVAE has no trained condition "
                    "for it", f"pass controls of the cell types {s['trained_cell_types'][:8]}, "
                    "or train with model.cell_type_conditioning=false",
                )  # fmt: skip
            codes["cell_type"] = np.full(n, self.cell_types.index(cell_type), np.int64)
        if "batch" in s["conditions"]:
            codes["batch"] = np.full(n, s["batches"].index(s["batch"]), np.int64)
        return codes

    def _encode(self, counts, library, codes) -> np.ndarray:
        raise NotImplementedError

    def _decode_mean(self, z, codes) -> np.ndarray:
        raise NotImplementedError

    def _decode_sample(self, z, library, codes, rng) -> np.ndarray:
        raise NotImplementedError

    def latent(self, control: np.ndarray, cell_type: str, rng) -> np.ndarray:
        """z (n, d) of the mode: prior draws (a), or the controls' posterior means (b)."""
        if self.mode == "a":
            rng = np.random.default_rng(0) if rng is None else rng
            shape = (len(control), int(self.settings["n_latent"]))
            return rng.standard_normal(shape).astype(np.float32)
        source = self._codes(self.settings["control_label"], cell_type, len(control))
        counts = np.expm1(control).astype(np.float32)
        return self._encode(counts, np.full(len(control), TARGET_SUM, np.float32), source)

    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Predicted log1p expression (n, G) for log1p controls (n, G) of one cell type."""
        control = checked_controls(control, self.genes, self.source)
        target = self._codes(perturbation, cell_type, len(control))  # refuses before any work
        z = self.latent(control, cell_type, rng)
        if library is None or rng is None:
            return self._decode_mean(z, target)
        lib = np.asarray(library, dtype=np.float32)
        return log1p_normalize(self._decode_sample(z, lib, target, rng), lib)
