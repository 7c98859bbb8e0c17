"""Predict perturbed populations from real control cells: the ST model or a baseline.

    control cells (counts, any gene order) -> the model's genes -> for each perturbation and
    cell type: N controls drawn (seeded, with replacement), in sets of ``set_size`` ->
    predicted log1p-normalized expression -> counts at each drawn control's library size
    -> one AnnData: the real control cells, then the predicted cells, in the controls' file
    gene order, obs = perturbation column (``target_gene``), cell type, ``source``.

Counts, not log1p floats, because cell-eval normalizes a counts file to its own median
library size: predictions on another scale than the real file would bias every metric.
Back to counts by stochastic rounding IN THE LOG1P SPACE the models predict in: a value
between log1p(k s) and log1p((k+1) s) (s = 1e4 / library) becomes k or k + 1 with the
probabilities that keep E[log1p(count s)] equal to the prediction. Rounding that keeps the
count mean instead (floor plus one with probability equal to the fraction) shifts the mean
log expression by Jensen's gap: on Papalexi's sparse genes that alone moved an ST's cell-eval
``mae`` from 0.111 to 0.122 (its training-mean baseline: 0.122). Plain rounding would zero
every gene predicted below half a count. Genes the model does not cover keep their control's
counts. Every predictor (ST, baselines) implements one method, so all share this path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from latentcell.data_pipelines.errors import DataValidationError

from .trained_runs import load_model_card, load_state, weights_path

__all__ = [
    "PopulationRequest",
    "Predictor",
    "STPredictor",
    "log1p_normalize",
    "predict_population",
    "to_counts",
]

TARGET_SUM = 1e4


def log1p_normalize(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """log1p of counts scaled to ``TARGET_SUM`` per cell (the models' input scale)."""
    scale = TARGET_SUM / np.maximum(np.asarray(library, dtype=np.float64), 1.0)
    return np.log1p(counts * scale[:, None]).astype(np.float32)


def to_counts(log1p: np.ndarray, library: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts at ``library`` per cell from log1p-normalized expression (see the module
    docstring): k or k + 1 around expm1(x) / s, unbiased for log1p(count * s), s = 1e4 /
    library."""
    x = np.clip(log1p, 0, None).astype(np.float64)
    per_unit = np.maximum(np.asarray(library, dtype=np.float64), 1.0)[:, None] / TARGET_SUM
    k = np.floor(np.expm1(x) * per_unit)
    low, high = np.log1p(k / per_unit), np.log1p((k + 1) / per_unit)
    up = np.clip((x - low) / (high - low), 0.0, 1.0)
    return (k + (rng.random(x.shape) < up)).astype(np.float32)


class Predictor(Protocol):
    """Predicted log1p expression (n, G) for control log1p expression (n, G) of one cell
    type under one perturbation, on the predictor's genes. ``library`` (the controls' library
    sizes) and ``rng``: for predictors that decode through a count VAE, which then sample
    cells from its likelihood (without them they return its mean); others ignore them."""

    genes: list[str]
    name: str

    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class PopulationRequest:
    """Which columns of the controls file mean what, and how many cells to predict."""

    perturbations: tuple[str, ...]
    cells_per_perturbation: int
    pert_col: str = "target_gene"
    control_label: str = "non-targeting"
    cell_type_col: str | None = "cell_type"
    seed: int = 0


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
        self.model.load_state_dict(load_state(weights_path(run_dir, weights)))
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
        if self.trained is None or encoder.kind == "external":
            return
        if encoder.kind == "onehot":
            untrained = [] if perturbation in self.trained else [perturbation]
        else:
            from latentcell.models.perturbation_encoders import perturbation_genes, split_genes

            known = set(
                perturbation_genes(self.trained, encoder.combo_separator, encoder.control_label)
            )
            genes = split_genes(perturbation, encoder.combo_separator, encoder.control_label)
            untrained = [g for g in genes if g not in known]
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


def _gene_matrix(controls: ad.AnnData, genes: list[str], source: str) -> np.ndarray:
    """Column indices of ``genes`` in the controls file, by var_names or a symbol/id column."""
    for keys in (controls.var_names, *(controls.var[c] for c in ("gene_symbol", "gene_id", "gene_symbols") if c in controls.var)):  # fmt: skip
        keys = pd.Index(np.asarray(keys, dtype=str))
        if keys.is_unique and pd.Index(genes).isin(keys).all():
            return keys.get_indexer(genes)
    missing = pd.Index(genes).difference(pd.Index(controls.var_names.astype(str)))
    raise DataValidationError(
        source, "var_names",
        f"{len(missing)} of the model's {len(genes)} genes are missing, e.g. {list(missing[:5])}",
        "pass controls measured on the training store's genes (ids or symbols)",
    )  # fmt: skip


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def predict_population(
    predictor: Predictor, controls: ad.AnnData, request: PopulationRequest, source: str
) -> ad.AnnData:
    """The prediction file (see the module docstring): real controls, then predictions."""
    r = request
    if r.cells_per_perturbation < 1:
        raise DataValidationError(source, "--cells-per-perturbation", "must be >= 1", "pass N >= 1")
    is_control = np.ones(controls.n_obs, dtype=bool)
    if r.pert_col in controls.obs:
        is_control = (controls.obs[r.pert_col].astype(str) == r.control_label).to_numpy()
    if not is_control.any():
        raise DataValidationError(
            source, r.pert_col, f"no cell is {r.control_label!r}",
            "pass a file holding control cells (or set the control label)",
        )  # fmt: skip
    ctrl = controls[is_control]
    columns = _gene_matrix(ctrl, predictor.genes, source)
    counts = _dense(ctrl.X)
    library = counts.sum(axis=1)
    has_types = r.cell_type_col is not None and r.cell_type_col in ctrl.obs
    cell_types = (
        ctrl.obs[r.cell_type_col].astype(str).to_numpy() if has_types else np.full(ctrl.n_obs, "")
    )
    rng = np.random.default_rng(r.seed)
    blocks, obs = [counts], [_obs(r, r.control_label, cell_types, "control", has_types)]
    for perturbation in r.perturbations:
        for cell_type in pd.unique(cell_types):
            pool = np.flatnonzero(cell_types == cell_type)
            draw = rng.choice(pool, size=r.cells_per_perturbation, replace=True)
            x = log1p_normalize(counts[draw][:, columns], library[draw])
            pred = predictor.predict(x, perturbation, cell_type, library[draw], rng)
            out = counts[draw].copy()
            out[:, columns] = to_counts(pred, library[draw], rng)
            blocks.append(out)
            n = r.cells_per_perturbation
            obs.append(_obs(r, perturbation, np.full(n, cell_type), predictor.name, has_types))
    frame = pd.concat(obs, ignore_index=True)
    frame.index = frame.index.astype(str)
    for column in frame.columns:
        frame[column] = frame[column].astype("category")
    result = ad.AnnData(X=sp.csr_matrix(np.concatenate(blocks)), obs=frame, var=ctrl.var.copy())
    result.uns["latentcell"] = {
        "predictor": predictor.name,
        "perturbations": list(r.perturbations),
        "cells_per_perturbation": r.cells_per_perturbation,
        "seed": r.seed,
        "controls": source,
    }
    return result


def _obs(r: PopulationRequest, label: str, cell_types: np.ndarray, kind: str, has_types: bool):
    frame = pd.DataFrame({r.pert_col: np.full(len(cell_types), label), "source": kind})
    if has_types:
        frame[r.cell_type_col] = cell_types
    return frame
