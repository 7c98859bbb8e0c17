"""A trained ST run behind the ``Predictor`` interface of ``predict.py`` (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.perturbation_labels import (
    UNKNOWN_CELL_TYPE_FIX,
    UNSEEN_CELL_TYPE,
    UNTRAINED_CELL_TYPE_FIX,
    untrained_cell_type,
    untrained_parts,
)

from .trained_runs import load_model_card, load_weights, weights_path

__all__ = ["UNSEEN", "UNSEEN_CELL_TYPE", "STPredictor", "load_predictor"]

UNSEEN = ("error", "generic")


class STPredictor:
    """A trained ST run behind the ``Predictor`` interface (EMA weights when kept).

    ``unseen``: what a perturbation without a trained embedding gets. ``"error"`` (default):
    a clear error. ``"generic"``: the generic perturbation vector the run learned through
    ``model.perturbation_dropout`` (its response to a perturbation of unknown identity), plus
    the target effect on the label's own genes when the run has one.

    ``unseen_cell_type``: the same for a cell type the run has no trained parameters for (no
    training set, so its cell-type row is its random initialisation; or, with
    ``basal="train"``, no training control, so no training-control mean). ``"error"``
    (default): a clear error. ``"unknown"``: the unknown cell type the run learned through
    ``model.cell_type_dropout`` and, with ``basal="train"``, the set's own mean as basal.
    ``routes`` says which of these fallbacks a prediction takes."""

    name = "st"

    def __init__(
        self,
        run_dir: str | Path,
        weights: str = "auto",
        unseen: str = "error",
        unseen_cell_type: str = "error",
    ) -> None:
        from .model_builders import ST_CLASS as MODEL_CLASS
        from .model_builders import build_st_model

        if unseen not in UNSEEN:
            raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}")
        if unseen_cell_type not in UNSEEN_CELL_TYPE:
            raise ValueError(
                f"unseen_cell_type must be one of {UNSEEN_CELL_TYPE}, got {unseen_cell_type!r}"
            )
        self.unseen, self.unseen_cell_type = unseen, unseen_cell_type
        self.card = load_model_card(run_dir, MODEL_CLASS)
        self.model = build_st_model(self.card).eval()
        load_weights(self.model, weights_path(run_dir, weights))
        self.genes = list(self.card["genes"])
        self.gene_symbols = list(self.card.get("gene_symbols", []))
        self.set_size = int(self.card.get("set_size", 128))
        cats = self.card["categories"]
        # the cell types the model conditions on ([]: it ignores the controls' cell type)
        self.cell_types = list(cats.get("cell_type", [])) if self.model.uses_cell_type else []
        self.labels = list(self.model.config.perturbation_labels)
        self.trained = self.card.get("trained_perturbations")  # None: a run from before
        self.trained_cell_types = self.card.get("trained_cell_types")  # None: the same
        self.bridge = None
        if self.model.config.space == "latent":
            from .vae_bridge import VAEBridge

            vae = self.card["vae"]
            self.bridge = VAEBridge(vae["vae_run"], "ema" if "ema" in vae["weights"] else "model")

    @property
    def run_labels(self):
        from .predict import RunLabels

        control = self.card["control_label"]
        roles = self.card["roles"]
        trained = [x for x in self.labels if x != control and self.is_trained(x)]
        return RunLabels(roles["perturbation"], control, roles.get("cell_type"), tuple(trained))

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

    def untrained_cell_type(self, cell_type: str) -> str:
        """Why the run has no trained parameters for ``cell_type`` ("" when it has them)."""
        m = self.model
        trained = self.trained_cell_types if m.cell_type is not None else None
        with_mean = None
        if m.config.basal == "train" and m.config.basal_cell_types:
            has_mean = ~torch.isnan(m.control_mean).any(1)
            with_mean = [t for t, ok in zip(self.cell_types, has_mean.tolist(), strict=True) if ok]
        return untrained_cell_type(cell_type, self.cell_types, trained, with_mean)

    def _cell_type(self, cell_type: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cell_type, unknown) for ``model.predict``: the type's own code, or with
        ``unseen_cell_type="unknown"`` the unknown cell type when it has no trained
        parameters; (None, None) for a model that ignores cell types."""
        m = self.model
        if not m.uses_cell_type:
            return None, None
        why = self.untrained_cell_type(cell_type)
        if not why:
            unknown = torch.zeros(1, dtype=torch.bool) if m.takes_unknown else None
            return torch.tensor([self.cell_types.index(cell_type)]), unknown
        if self.unseen_cell_type != "unknown":
            raise DataValidationError(
                "--controls", f"cell type {cell_type!r}", why, UNTRAINED_CELL_TYPE_FIX
            )
        if not m.takes_unknown:
            raise DataValidationError(
                "--unseen-cell-type", "unknown",
                f"{why}, and this run learned no unknown cell type", UNKNOWN_CELL_TYPE_FIX,
            )  # fmt: skip
        return torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool)

    def is_trained(self, perturbation: str) -> bool:
        try:
            self.check_trained(perturbation)
        except DataValidationError:
            return False
        return True

    def routes(self, perturbation: str, cell_type: str) -> dict[str, str]:
        """The fallbacks a prediction of ``perturbation`` in ``cell_type`` takes:
        ``{"perturbation": "generic"}`` and/or ``{"cell_type": "unknown"}``; {} when it
        uses trained parameters only (``predict_population`` records them in the file)."""
        out = {}
        if self._embedding(perturbation)[1] is not None:
            out["perturbation"] = "generic"
        unknown = self._cell_type(cell_type)[1]
        if unknown is not None and bool(unknown.any()):
            out["cell_type"] = "unknown"
        return out

    @torch.no_grad()
    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        if self.model.batch is not None:
            raise DataValidationError(
                "--run", "model.batch_conditioning", "this ST model is batch-conditioned, and "
                "control-set prediction has no batch per predicted cell",
                "train the ST model with model.batch_conditioning=false",
            )  # fmt: skip
        code, generic, targets = self._embedding(perturbation)
        ct, unknown = self._cell_type(cell_type)
        x = torch.from_numpy(control)
        if self.bridge is not None:
            x = self.bridge.encode(x)
        out = []
        for a in range(0, len(x), self.set_size):
            chunk = x[a : a + self.set_size][None]
            out.append(
                self.model.predict(
                    chunk, code, cell_type=ct, generic=generic, targets=targets, unknown=unknown
                )[0]
            )
        pred = torch.cat(out)
        if self.bridge is None:
            return pred.numpy()
        if library is None or rng is None:
            return self.bridge.decode(pred).numpy()
        return self.bridge.sample(pred.numpy(), library, rng)


def load_predictor(run_dir: str | Path, options) -> STPredictor:
    """The ST family's predictor (``families.registry``): ``options`` is a
    ``predict.PredictOptions``."""
    return STPredictor(run_dir, options.weights, options.unseen, options.unseen_cell_type)
