"""A trained ST run behind the ``Predictor`` interface of ``predict.py`` (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.perturbation_labels import untrained_parts

from .trained_runs import load_model_card, load_weights, weights_path

__all__ = ["UNSEEN", "STPredictor"]

UNSEEN = ("error", "generic")


class STPredictor:
    """A trained ST run behind the ``Predictor`` interface (EMA weights when kept).

    ``unseen``: what a perturbation without a trained embedding gets. ``"error"`` (default):
    a clear error. ``"generic"``: the generic perturbation vector the run learned through
    ``model.perturbation_dropout`` (its response to a perturbation of unknown identity), plus
    the target effect on the label's own genes when the run has one."""

    name = "st"

    def __init__(self, run_dir: str | Path, weights: str = "auto", unseen: str = "error") -> None:
        from .st_stage import MODEL_CLASS, build_st_model

        if unseen not in UNSEEN:
            raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}")
        self.unseen = unseen
        self.card = load_model_card(run_dir, MODEL_CLASS)
        self.model = build_st_model(self.card).eval()
        load_weights(self.model, weights_path(run_dir, weights))
        self.genes = list(self.card["genes"])
        self.gene_symbols = list(self.card.get("gene_symbols", []))
        self.set_size = int(self.card.get("set_size", 128))
        cats = self.card["categories"]
        self.cell_types = list(cats.get("cell_type", []))
        self.labels = list(self.model.config.perturbation_labels)
        self.trained = self.card.get("trained_perturbations")  # None: a run from before
        self.bridge = None
        if self.model.config.space == "latent":
            from .vae_bridge import VAEBridge

            vae = self.card["vae"]
            self.bridge = VAEBridge(vae["vae_run"], "ema" if "ema" in vae["weights"] else "model")

    def check_trained(self, perturbation: str) -> None:
        """A onehot / gene_table vector the split kept out of training was never trained (it
        is still its random initialisation): refuse it rather than predict from noise."""
        encoder = self.model.perturbation.config
        untrained = untrained_parts(
            perturbation, self.trained, encoder.kind, encoder.combo_separator,
            encoder.control_label,
        )  # fmt: skip
        if untrained:
            raise DataValidationError(
                "--perturbations", perturbation,
                f"no training cell carried {untrained} (the run's split held them out), so "
                f"the model's {encoder.kind} vector for it was never trained",
                "train with model.perturbation_encoder=external (gene vectors from a file) to "
                "predict unseen perturbations, or with model.perturbation_dropout > 0 and "
                "predict with --unseen generic (the learned generic perturbation), or use a "
                "run whose split trains on it",
            )  # fmt: skip

    def _embedding(self, perturbation: str):
        """(code, generic, targets) for ``model.predict``: the label's own embedding, or with
        ``unseen="generic"`` the generic vector when it has no trained one."""
        try:
            code = self.model.extend([perturbation])  # known genes: new combinations
            self.check_trained(perturbation)
            return code, None, None
        except DataValidationError:
            if self.unseen != "generic":
                raise
        if not self.model.config.perturbation_dropout:
            raise DataValidationError(
                "--unseen", "generic",
                f"{perturbation!r} has no trained embedding and this run learned no generic "
                "perturbation vector",
                "train with model.perturbation_dropout > 0 (e.g. 0.2) to use --unseen generic",
            )  # fmt: skip
        targets = (
            self.model.target_rows([perturbation]) if self.model.config.target_effect else None
        )
        return torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), targets

    def is_trained(self, perturbation: str) -> bool:
        try:
            self.check_trained(perturbation)
        except DataValidationError:
            return False
        return True

    @torch.no_grad()
    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        code, generic, targets = self._embedding(perturbation)
        ct = None
        if self.model.cell_type is not None:
            if cell_type not in self.cell_types:
                raise DataValidationError(
                    "--controls", "cell type", f"{cell_type!r} was not seen in training",
                    f"use controls of {self.cell_types}",
                )  # fmt: skip
            ct = torch.tensor([self.cell_types.index(cell_type)])
        x = torch.from_numpy(control)
        if self.bridge is not None:
            x = self.bridge.encode(x)
        out = []
        for a in range(0, len(x), self.set_size):
            chunk = x[a : a + self.set_size][None]
            out.append(
                self.model.predict(chunk, code, cell_type=ct, generic=generic, targets=targets)[0]
            )
        pred = torch.cat(out)
        if self.bridge is None:
            return pred.numpy()
        if library is None or rng is None:
            return self.bridge.decode(pred).numpy()
        return self.bridge.sample(pred.numpy(), library, rng)
