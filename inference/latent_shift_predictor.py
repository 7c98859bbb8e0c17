"""A trained latent-shift run behind ``predict.RunPredictor``: embed the controls the run's
way (its PCA, or its count VAE's posterior means), move them with the run's predictor,
decode (the PCA inverse of the shift, or the VAE decoder sampled at each control's library
size when ``rng`` is given, its mean otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.latent_shift import MODEL_CLASS, LatentShiftRun
from latentcell.models.perturbation_labels import untrained_parts

from .run_cards import load_model_card

__all__ = ["LatentShiftPredictor", "load_predictor"]


class LatentShiftPredictor:
    """``predict(control_log1p, perturbation, cell_type, library, rng)`` -> log1p (n, G).

    The predictor conditions on the control cells' embedding, not on a cell-type label, so
    ``cell_types`` is empty (controls without a cell-type column are accepted). A
    perturbation whose descriptor was never trained (a onehot label, or a gene_table gene,
    without training cells) is refused in one line; external descriptors are fixed vectors,
    so any label of the store's genes is predicted."""

    name = "latent-shift"
    cell_types: list[str] = []

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.card = load_model_card(run_dir, MODEL_CLASS)
        self.run = LatentShiftRun.load(self.run_dir / "final", self.card)
        self.genes = list(self.card["genes"])
        self.gene_symbols = list(self.card.get("gene_symbols", []))
        self.trained = list(self.card["trained_perturbations"])
        embedding = self.card["embedding"]
        self.decode_mode = embedding.get("decode", "shift")
        self.bridge = None
        if embedding["kind"] == "vae":
            from .vae_bridge import VAEBridge

            vae = embedding["vae"]
            self.bridge = VAEBridge(vae["vae_run"], "ema" if "ema" in vae["weights"] else "model")

    @property
    def run_labels(self):
        from .predict import RunLabels

        control, roles = self.card["control_label"], self.card["roles"]
        labels = [x for x in self.card["categories"]["perturbation"] if x != control]
        usable = tuple(x for x in labels if not self._untrained(x))
        return RunLabels(roles["perturbation"], control, roles.get("cell_type"), usable)

    def _untrained(self, perturbation: str) -> list[str]:
        d = self.run.descriptors
        return untrained_parts(perturbation, self.trained, d.kind, d.separator, d.control_label)

    def check_trained(self, perturbation: str) -> None:
        untrained = self._untrained(perturbation)
        if untrained:
            kind = self.run.descriptors.kind
            raise DataValidationError(
                "--perturbations", perturbation,
                f"no training cell carried {untrained} (the run's split held them out), so "
                f"the run's {kind} descriptor for it was never trained",
                "train with --set model.descriptor=external (gene vectors from a file) to "
                "predict unseen perturbations, or use a run whose split trains on it",
            )  # fmt: skip

    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        control = np.asarray(control, dtype=np.float32)
        if perturbation == self.card["control_label"]:
            return control
        self.check_trained(perturbation)
        if self.bridge is None:
            pca = self.run.pca
            ctrl_emb = pca.encode(control)
            return pca.decode(self.run.shift(ctrl_emb, perturbation), ctrl_emb, control,
                              self.decode_mode)  # fmt: skip
        pred = self.run.shift(self.bridge.encode_numpy(control), perturbation)
        if library is None or rng is None:
            return self.bridge.decode_numpy(pred)
        return self.bridge.sample(pred, library, rng)


def load_predictor(run_dir: str | Path, options) -> LatentShiftPredictor:
    """The latent-shift family's predictor (``families.registry``). ``options``
    (``predict.PredictOptions``) ask for fallbacks this family has none of: the predictor
    conditions on no cell-type label (so no cell type is unseen), and it refuses a
    perturbation without a trained descriptor whatever ``unseen`` says, as ``predict`` does
    for a run that learned no fallback. One weights file, no modes."""
    del options
    return LatentShiftPredictor(run_dir)
