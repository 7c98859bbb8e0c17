"""Predict perturbed populations from real control cells: the ST model or a baseline.

    control cells (counts, any gene order) -> the model's genes -> for each perturbation and
    cell type: N controls drawn (seeded, with replacement), in sets of ``set_size`` ->
    predicted log1p-normalized expression -> counts at each drawn control's library size
    -> one AnnData: the real control cells, then the predicted cells, in the controls' file
    gene order, obs = perturbation column (``target_gene``), cell type, ``source``. Genes are
    named and matched by ``gene_names.py``'s rule (var_names: the controls'; ids or symbols).

Plain numpy/anndata (no torch): the ST model's predictor lives in ``st_predictor.py``, and the
torch-free ONNX runtime writes its prediction files through ``predict_population`` too.

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

Cell types: controls without the cell-type column are read as ``build`` reads an input without
one: every cell gets ``IMPLICIT_LABEL`` ("unspecified") when the predictor's cell types
include it (the run's store had no such column either); a predictor that conditions on real
cell types refuses them, naming the column. Fallbacks a predictor takes for labels it has no
trained parameters for (``--unseen generic``, ``--unseen-cell-type unknown``) are recorded in
the file (``uns["latentcell"]["fallbacks"]``), so a prediction never hides its route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.schemas import GENE_ID_FIELDS, GENE_SYMBOL_FIELDS, IMPLICIT_LABEL
from latentcell.models.expression import log1p_normalize, to_counts

from .gene_names import GeneNames

__all__ = [
    "PopulationRequest",
    "PredictOptions",
    "Predictor",
    "RunLabels",
    "RunPredictor",
    "log1p_normalize",
    "predict_population",
    "to_counts",
]


class Predictor(Protocol):
    """Predicted log1p expression (n, G) for control log1p expression (n, G) of one cell
    type under one perturbation, on the predictor's genes. ``library`` (the controls' library
    sizes) and ``rng``: for predictors that decode through a count VAE, which then sample
    cells from its likelihood (without them they return its mean); others ignore them.

    Optional, looked up with getattr: ``cell_types`` (the cell types the predictor conditions
    on; absent or empty: it ignores them) and ``routes(perturbation, cell_type)`` (the
    fallbacks that prediction takes, e.g. ``{"cell_type": "unknown"}``)."""

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
class PredictOptions:
    """How ``predict --run`` loads a family's predictor. ``mode``: the family's prediction
    mode (``Family.modes``; None = its default); the ``unseen`` options are ST's fallbacks
    for labels without trained parameters (other families refuse such labels); ``steps`` and
    ``guidance``: a sampling mode's DDIM steps and guidance scale (None = the run's)."""

    weights: str = "auto"
    unseen: str = "error"
    unseen_cell_type: str = "error"
    mode: str | None = None
    steps: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class RunLabels:
    """What a trained run knows about its labels: the defaults of ``predict --run``."""

    pert_col: str
    control_label: str
    cell_type_col: str | None
    perturbations: tuple[str, ...]  # the trained perturbations, the control excluded

    @classmethod
    def from_settings(cls, settings: dict) -> RunLabels:
        """From a predictor's settings dict (``columns``, ``control_label``, ``trained``: the
        cvae and latent-delta families' shared keys)."""
        control, columns = settings["control_label"], settings["columns"]
        trained = tuple(x for x in settings["trained"] if x != control)
        return cls(columns["perturbation"], control, columns["cell_type"], trained)


class RunPredictor(Predictor, Protocol):
    """A predictor loaded from a finished run (``Family.predictor``): a ``Predictor`` that
    also says which columns and labels its run was trained on."""

    run_labels: RunLabels


@dataclass(frozen=True)
class PopulationRequest:
    """Which columns of the controls file mean what, and how many cells to predict."""

    perturbations: tuple[str, ...]
    cells_per_perturbation: int
    pert_col: str = "target_gene"
    control_label: str = "non-targeting"
    cell_type_col: str | None = "cell_type"
    seed: int = 0


CONTROLS_FIX = "pass controls measured on the training store's genes (Ensembl ids or symbols)"


def _gene_columns(
    controls: ad.AnnData, names: GeneNames, source: str, fix: str = CONTROLS_FIX
) -> list[int]:
    """Column of each model gene in the controls: by var_names, else an id or symbol column,
    each name matched to the model's keys, ids and symbols (``gene_names``)."""
    var = controls.var
    candidates = [("var_names", [str(g) for g in var.index])]
    candidates += [(f"var/{c}", [str(g) for g in var[c]])
                   for c in (*GENE_ID_FIELDS, *GENE_SYMBOL_FIELDS) if c in var]  # fmt: skip
    return names.first_match(candidates, source, fix)


def _gene_matrix(
    adata: ad.AnnData, genes: list[str], source: str, fix: str = CONTROLS_FIX
) -> list[int]:
    """Columns of ``genes`` (names without ids or symbols beside them) in ``adata``: how the
    baselines (``evaluation/perturbation_baselines.py``) read their training files."""
    return _gene_columns(adata, GeneNames.from_card(genes), source, fix)


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
    names = GeneNames.of(predictor)
    columns = _gene_columns(ctrl, names, source)
    counts = _dense(ctrl.X)
    library = counts.sum(axis=1)
    has_types = r.cell_type_col is not None and r.cell_type_col in ctrl.obs
    if has_types:
        cell_types = ctrl.obs[r.cell_type_col].astype(str).to_numpy()
    else:
        cell_types = np.full(ctrl.n_obs, _missing_cell_type(predictor, r, source))
    rng = np.random.default_rng(r.seed)
    blocks, obs = [counts], [_obs(r, r.control_label, cell_types, "control", has_types)]
    routes, fallbacks = getattr(predictor, "routes", None), {}
    for perturbation in r.perturbations:
        for cell_type in pd.unique(cell_types):
            pool = np.flatnonzero(cell_types == cell_type)
            draw = rng.choice(pool, size=r.cells_per_perturbation, replace=True)
            x = log1p_normalize(counts[draw][:, columns], library[draw])
            pred = predictor.predict(x, perturbation, cell_type, library[draw], rng)
            for kind, route in (routes(perturbation, cell_type) if routes else {}).items():
                label = perturbation if kind == "perturbation" else cell_type
                fallbacks.setdefault(kind, {})[label] = route
            out = counts[draw].copy()
            out[:, columns] = to_counts(pred, library[draw], rng)
            blocks.append(out)
            n = r.cells_per_perturbation
            obs.append(_obs(r, perturbation, np.full(n, cell_type), predictor.name, has_types))
    frame = pd.concat(obs, ignore_index=True)
    frame.index = frame.index.astype(str)
    for column in frame.columns:
        frame[column] = frame[column].astype("category")
    var = names.var_frame(ctrl.var, columns)
    result = ad.AnnData(X=sp.csr_matrix(np.concatenate(blocks)), obs=frame, var=var)
    result.uns["latentcell"] = {
        "predictor": predictor.name,
        "perturbations": list(r.perturbations),
        "cells_per_perturbation": r.cells_per_perturbation,
        "seed": r.seed,
        "controls": source,
    }
    if fallbacks:  # e.g. {"cell_type": {"B": "unknown"}, "perturbation": {"X": "generic"}}
        result.uns["latentcell"]["fallbacks"] = fallbacks
    return result


def _missing_cell_type(predictor: Predictor, r: PopulationRequest, source: str) -> str:
    """The cell type of controls without the cell-type column: ``IMPLICIT_LABEL`` when the
    predictor knows it (as ``build`` labels such cells), "" for a predictor that ignores cell
    types; a predictor conditioned on real cell types refuses them."""
    cell_types = list(getattr(predictor, "cell_types", None) or [])
    if not cell_types:
        return ""
    if IMPLICIT_LABEL in cell_types:
        return IMPLICIT_LABEL
    column = r.cell_type_col or "cell_type"
    raise DataValidationError(
        source, column,
        f"the controls have no cell-type column {column!r}, and the model conditions on the "
        f"cell types {cell_types[:20]}",
        f"add obs[{column!r}] with each control's cell type, or name the controls' column "
        "with --cell-type-col",
    )  # fmt: skip


def _obs(r: PopulationRequest, label: str, cell_types: np.ndarray, kind: str, has_types: bool):
    frame = pd.DataFrame({r.pert_col: np.full(len(cell_types), label), "source": kind})
    if has_types:
        frame[r.cell_type_col] = cell_types
    return frame
