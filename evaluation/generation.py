"""``evaluate_generation``: generated count cells against real held-out cells, beside baselines.

Methods reported side by side, all against the same real reference cells of each condition:
- ``generated``: the model's cells; each entry of ``baselines`` likewise;
- ``gaussian_pca``: a per-condition Gaussian in the real PCA space (mean and full covariance of
  the fitting cells), sampled to the reference size. Its gene-level metrics use the samples
  mapped back through the PCA loadings plus the real mean, clipped at 0 (log1p values are never
  negative); its zeros are the clipped entries, so its zero-fraction numbers are weak;
- ``real_ceiling``: real against real: the "fit" cells of the condition (part of ``train``
  when given, else a part of ``real`` disjoint from the reference), subsampled to the
  reference size.
Which real cells are the reference, the fit cells and the PCA cells is decided in ``splits``;
the reference is the same for EVERY method, at the same sample size. The fit cells also fit
``gaussian_pca`` and the classifier, which predicts ``classifier_col`` (default: the condition
columns; e.g. ``cell_type`` when conditions are cell type x stimulation) from PCA scores; its
accuracy on the reference cells (held-out real) is reported as the ceiling's own accuracy,
since the ceiling's cells are the classifier's training cells. A generated file holding several
sampling seeds (``obs['sampling_seed']``) is scored per seed; see ``seeds``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from latentcell.data_pipelines.atomic import write_json_atomic
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation import metrics as m
from latentcell.evaluation.figures import plot_metric_bars, plot_pca_panels
from latentcell.evaluation.protocol import (
    DEFAULT_PROTOCOL,
    MIN_CELLS_AUTO,
    MIN_CELLS_CAP,
    GenerationProtocol,
    RealPCA,
    check_input,
    condition_labels,
    counts_matrix,
    log_normalize,
    min_cells_floor,
    reference_genes,
    rng_for,
    select_hvgs,
)
from latentcell.evaluation.seeds import SEED_COL, combine, seed_groups, seed_report
from latentcell.evaluation.splits import CellSplit, shuffled_rows, split_cells

GENERATED, GAUSSIAN, CEILING = "generated", "gaussian_pca", "real_ceiling"
RESERVED_NAMES = (GENERATED, GAUSSIAN, CEILING)
SUMMARY_FILE = "summary.json"
PCA_FIGURE = "pca_real_vs_generated.png"
BARS_FIGURE = "metrics_vs_baselines.png"


def baseline_source(name: str) -> str:
    """The name a baseline's input goes by in error messages (the CLI maps it to the file)."""
    return f"baseline {name}"


@dataclass(frozen=True)
class CellSet:
    """Cells of one condition: PCA scores and log1p expression on the HVGs, row-aligned, and
    their classifier labels (None when a set has none, e.g. a mixed-label Gaussian)."""

    pcs: np.ndarray
    expr: np.ndarray
    labels: np.ndarray | None = None

    def head(self, n: int) -> CellSet:
        """The first ``n`` cells (rows were shuffled when drawn, so this is a random subset)."""
        labels = None if self.labels is None else self.labels[:n]
        return CellSet(self.pcs[:n], self.expr[:n], labels)


def _model_rows(
    adata: ad.AnnData,
    source: str,
    condition_col: str,
    conditions: list[str],
    protocol: GenerationProtocol,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Shuffled, capped rows per evaluated condition; every condition needs min_cells cells
    (in every sampling seed when the file holds several)."""
    labels = condition_labels(adata, condition_col)
    rows = {
        c: shuffled_rows(labels, c, protocol.seed, source)[: protocol.max_cells_per_condition]
        for c in conditions
    }
    short = {c: len(r) for c, r in rows.items() if len(r) < protocol.min_cells}
    if short:
        cond, n = next(iter(short.items()))
        where = "" if seed is None else f" in {SEED_COL} {seed}"
        raise DataValidationError(
            source,
            f"obs['{condition_col}']",
            f"{len(short)} evaluated condition(s) have fewer than min_cells="
            f"{protocol.min_cells} cells{where} (e.g. {cond!r}: {n})",
            "generate at least min_cells cells for every condition of the real data",
        )
    return rows


def _replicates(
    adata: ad.AnnData,
    source: str,
    condition_col: str,
    conditions: list[str],
    protocol: GenerationProtocol,
) -> dict[int | None, tuple[ad.AnnData, dict[str, np.ndarray]]]:
    """Per sampling seed (``None``: one seed or none), its cells and their rows per condition."""
    return {
        seed: (cells, _model_rows(cells, source, condition_col, conditions, protocol, seed))
        for seed, cells in seed_groups(adata, source).items()
    }


def _expression(
    adata: ad.AnnData,
    rows: Mapping[str, np.ndarray],
    genes: pd.Index,
    hvg: np.ndarray,
    protocol: GenerationProtocol,
) -> dict[str, np.ndarray]:
    """log1p-normalised HVG expression per condition (one sparse read for all conditions)."""
    conds = [c for c in rows if len(rows[c])]
    if not conds:
        return {}
    counts = counts_matrix(adata, genes, np.concatenate([rows[c] for c in conds]))
    expr = log_normalize(counts, hvg, protocol)
    bounds = np.cumsum([0] + [len(rows[c]) for c in conds])
    return {c: expr[a:b] for c, a, b in zip(conds, bounds[:-1], bounds[1:], strict=True)}


@dataclass(frozen=True)
class _Space:
    """The aligned genes, the HVGs and the real PCA that every set is projected with."""

    genes: pd.Index
    hvg: np.ndarray
    pca: RealPCA
    protocol: GenerationProtocol
    classifier_col: str

    @classmethod
    def fit(
        cls, split: CellSplit, genes: pd.Index, protocol: GenerationProtocol, classifier_col: str
    ):
        """HVGs on the split's HVG cells, then the PCA on its PCA cells (real cells only)."""
        hvg = select_hvgs(counts_matrix(split.hvg.data, genes, split.hvg.rows), protocol.n_hvg)
        pca_counts = counts_matrix(split.pca.data, genes, split.pca.rows)
        expr = log_normalize(pca_counts, hvg, protocol)
        return cls(genes, hvg, RealPCA.fit(expr, protocol.n_pcs, protocol.seed), protocol,
                   classifier_col)  # fmt: skip

    def cells(self, adata: ad.AnnData, rows: Mapping[str, np.ndarray]) -> dict[str, CellSet]:
        """The cells of ``rows`` per condition, projected, with their classifier labels."""
        expr = _expression(adata, rows, self.genes, self.hvg, self.protocol)
        labels = condition_labels(adata, self.classifier_col)
        return {c: CellSet(self.pca.transform(e), e, labels[rows[c]]) for c, e in expr.items()}


def _single_label(cells: CellSet | None) -> str | None:
    """The one classifier label of a set, or None when it has several (or no cells)."""
    if cells is None or cells.labels is None:
        return None
    values = np.unique(cells.labels)
    return values[0] if len(values) == 1 else None


def _gaussian_sets(
    fit: Mapping[str, CellSet],
    sizes: Mapping[str, int],
    pca: RealPCA,
    protocol: GenerationProtocol,
) -> dict[str, CellSet]:
    """Per-condition Gaussian samples in PCA space; expression decoded and clipped at 0.
    Their classifier label is the condition's, when its fit cells all carry one label."""
    out = {}
    for cond, n in sizes.items():
        cells = fit.get(cond)
        if cells is None or len(cells.pcs) < protocol.min_cells:
            continue
        mean = cells.pcs.mean(axis=0)
        cov = np.atleast_2d(np.cov(cells.pcs, rowvar=False))
        rng = rng_for(protocol.seed, GAUSSIAN, cond)
        z = rng.multivariate_normal(mean, cov, size=n, method="eigh", check_valid="ignore")
        label = _single_label(cells)
        labels = None if label is None else np.full(n, label, dtype=object)
        out[cond] = CellSet(z, np.clip(pca.inverse(z), 0.0, None), labels)
    return out


MEMORIZATION_MAX_TRAIN = 20_000  # training cells per condition searched for nearest neighbours


def _compare(
    ref: CellSet, gen: CellSet, protocol: GenerationProtocol, train: CellSet | None = None
) -> dict[str, float]:
    """Every per-condition metric of ``gen`` against ``ref`` (equal sizes); with the
    condition's training cells, also the memorization check (nan without them)."""
    dcr = float("nan")
    if train is not None and len(train.pcs):
        dcr = m.distance_to_training_ratio(train.pcs, ref.pcs, gen.pcs)
    out: dict[str, float] = {
        "distance_to_training_ratio": dcr,
        "n_cells": len(gen.pcs),
        "mmd": m.mmd_rbf(ref.pcs, gen.pcs, protocol.mmd_bandwidths),
        "energy_distance": m.energy_distance(ref.pcs, gen.pcs),
        "wasserstein": m.wasserstein(ref.pcs, gen.pcs, protocol.wasserstein_exact_max),
        "knn_auc": m.knn_auc(
            ref.pcs, gen.pcs, protocol.knn_k, protocol.seed, protocol.knn_test_fraction
        ),
    }
    out.update(m.prdc(ref.pcs, gen.pcs, protocol.knn_k))
    out.update(m.gene_mean_var_agreement(ref.expr, gen.expr))
    out.update(m.zero_fraction_agreement(ref.expr, gen.expr))
    out["per_gene_wasserstein"] = m.per_gene_wasserstein(ref.expr, gen.expr)
    return out


def _macro(per_condition: Mapping[str, dict]) -> dict[str, float]:
    """Mean over evaluated conditions of each metric (nan entries ignored)."""
    scored = [v for v in per_condition.values() if "not_evaluated" not in v]
    out: dict[str, float] = {"n_conditions": len(scored)}
    keys = [k for k in (scored[0] if scored else {}) if k != "n_cells"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns
        for key in keys:
            out[key] = float(np.nanmean([v[key] for v in scored]))
    return out


def _score_method(
    reference: Mapping[str, CellSet],
    cells: Mapping[str, CellSet],
    protocol: GenerationProtocol,
    train: Mapping[str, CellSet] | None = None,
) -> tuple[dict, dict[str, CellSet]]:
    """Per-condition metrics and the equal-size cells used for each condition; ``train``:
    each condition's training cells, for the memorization check."""
    per_condition, used = {}, {}
    for cond, ref in reference.items():
        gen = cells.get(cond)
        n_gen = 0 if gen is None else len(gen.pcs)
        if n_gen < protocol.min_cells:
            per_condition[cond] = {"n_cells": n_gen, "not_evaluated": "fewer than min_cells"}
            continue
        n = min(len(ref.pcs), n_gen)
        used[cond] = gen.head(n)
        per_condition[cond] = _compare(ref.head(n), used[cond], protocol, (train or {}).get(cond))
    return per_condition, used


def _pooled(sets: Mapping[str, CellSet]) -> tuple[np.ndarray, np.ndarray]:
    """All cells' PCA scores and their CONDITION labels."""
    pcs = np.concatenate([s.pcs for s in sets.values()])
    labels = np.concatenate([[c] * len(s.pcs) for c, s in sets.items()])
    return pcs, labels


def _classifier_labels(sets: Mapping[str, CellSet]) -> np.ndarray | None:
    """All cells' classifier labels, or None when some set has none."""
    if any(s.labels is None for s in sets.values()):
        return None
    return np.concatenate([s.labels for s in sets.values()])


@dataclass(frozen=True)
class _Classifier:
    """Predicts ``classifier_col`` from PCA scores, trained on the real fit cells (``model``
    is None when they carry fewer than 2 labels, and every accuracy is then nan)."""

    model: object | None
    n_train_cells: int
    n_classes: int
    reference_accuracy: float

    @classmethod
    def fit(cls, fit: Mapping[str, CellSet], reference: Mapping[str, CellSet], seed: int):
        scored = {c: s for c, s in fit.items() if len(s.pcs)}
        labels = _classifier_labels(scored) if scored else np.array([])
        n_classes = len(np.unique(labels)) if labels is not None else 0
        model = None
        if n_classes >= 2:
            model = m.fit_condition_classifier(_pooled(scored)[0], labels, seed=seed)
        n_train = int(sum(len(s.pcs) for s in scored.values()))
        return cls(model, n_train, n_classes, cls._score(model, reference))

    @staticmethod
    def _score(model, sets: Mapping[str, CellSet]) -> float:
        labels = _classifier_labels(sets) if sets else None
        if model is None or labels is None:
            return float("nan")
        return m.accuracy(model, _pooled(sets)[0], labels)

    def accuracy(self, sets: Mapping[str, CellSet]) -> float:
        """Accuracy on ``sets`` against their own classifier labels (nan without labels)."""
        return self._score(self.model, sets)


def _score_replicate(
    name: str,
    reference: Mapping[str, CellSet],
    cells: Mapping[str, CellSet],
    protocol: GenerationProtocol,
    train_cells: Mapping[str, CellSet] | None,
    classifier: _Classifier,
) -> tuple[dict, dict[str, CellSet]]:
    """One method's (one seed's) entry (macro, pooled, per_condition) and the cells it used.
    The ceiling gets no memorization check (its cells are training cells) and, as its
    classifier accuracy, the accuracy on held-out real cells."""
    per_condition, used = _score_method(
        reference, cells, protocol, None if name == CEILING else train_cells
    )
    pooled = {"silhouette_by_condition": float("nan"), "classifier_accuracy": float("nan")}
    if used:
        pcs, labels = _pooled(used)
        pooled["silhouette_by_condition"] = m.silhouette_by_condition(
            pcs, labels, protocol.silhouette_max_cells, protocol.seed
        )
        pooled["classifier_accuracy"] = (
            classifier.reference_accuracy if name == CEILING else classifier.accuracy(used)
        )
    return {"macro": _macro(per_condition), "pooled": pooled, "per_condition": per_condition}, used


def _checked_inputs(
    generated: ad.AnnData,
    real: ad.AnnData,
    train: ad.AnnData | None,
    baselines: Mapping[str, ad.AnnData],
    condition_col: str,
    classifier_col: str,
) -> tuple[pd.Index, ad.AnnData | None, dict[str, tuple[ad.AnnData, str]]]:
    """(real genes, train, {method: (its AnnData, its source)}), every input checked."""
    clash = [n for n in baselines if n in RESERVED_NAMES]
    if clash:
        raise DataValidationError(
            baseline_source(clash[0]), "name", "reserved method name", "rename the baseline"
        )
    check_input(real, "real", condition_col, classifier_col=classifier_col)
    genes = reference_genes(real, "real")
    if train is not None:
        train = check_input(train, "train", condition_col, genes, classifier_col)
    models = {GENERATED: (generated, GENERATED)}
    models.update({n: (a, baseline_source(n)) for n, a in baselines.items()})
    models = {
        name: (check_input(adata, source, condition_col, genes, classifier_col), source)
        for name, (adata, source) in models.items()
    }
    return genes, train, models


def _training_cells(
    train: ad.AnnData | None, condition_col: str, conditions: list[str], space: _Space
) -> dict[str, CellSet] | None:
    """Every training cell of each condition (capped), for the memorization check."""
    if train is None:
        return None
    labels = condition_labels(train, condition_col)
    rows = {c: np.flatnonzero(labels == c)[:MEMORIZATION_MAX_TRAIN] for c in conditions}
    return space.cells(train, rows)


def evaluate_generation(
    generated: ad.AnnData,
    real: ad.AnnData,
    condition_col: str,
    *,
    classifier_col: str | None = None,
    train: ad.AnnData | None = None,
    baselines: Mapping[str, ad.AnnData] | None = None,
    protocol: GenerationProtocol = DEFAULT_PROTOCOL,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Score generated counts against real held-out counts; see the module docstring.

    Inputs are AnnData with raw counts in ``.X`` and ``obs[condition_col]`` (and the
    ``classifier_col`` column(s), default ``condition_col``, that the classifier predicts).
    A generated or baseline file whose ``obs['sampling_seed']`` holds several seeds is scored
    per seed and reported as the mean (``methods``) with sd and per-seed values (``seeds``).
    Returns a JSON-serialisable summary (nan written as null); with ``out_dir``, also writes
    ``summary.json`` and two figures there. Bad input raises ``DataValidationError`` whose
    path is the input's role: ``real``, ``train``, ``generated`` or ``baseline NAME``.
    """
    classifier_col = classifier_col or condition_col
    genes, train, models = _checked_inputs(
        generated, real, train, dict(baselines or {}), condition_col, classifier_col
    )
    split = split_cells(real, train, condition_col, protocol)
    used_protocol = replace(protocol, min_cells=split.min_cells)
    replicates = {
        name: _replicates(adata, source, condition_col, split.conditions, used_protocol)
        for name, (adata, source) in models.items()
    }
    space = _Space.fit(split, genes, used_protocol, classifier_col)
    reference = space.cells(real, split.reference)
    fit = space.cells(split.fit_data, split.fit)
    method_cells = {
        name: {seed: space.cells(cells, rows) for seed, (cells, rows) in reps.items()}
        for name, reps in replicates.items()
    }
    sizes = {c: len(r.pcs) for c, r in reference.items()}
    method_cells[GAUSSIAN] = {None: _gaussian_sets(fit, sizes, space.pca, used_protocol)}
    method_cells[CEILING] = {None: fit}
    train_cells = _training_cells(train, condition_col, split.conditions, space)
    classifier = _Classifier.fit(fit, reference, protocol.seed)

    scored = {
        name: {
            seed: _score_replicate(name, reference, cells, used_protocol, train_cells, classifier)
            for seed, cells in reps.items()
        }
        for name, reps in method_cells.items()
    }
    entries = {name: {s: entry for s, (entry, _) in reps.items()} for name, reps in scored.items()}
    summary = _summary(
        protocol, split, condition_col, classifier_col, space, reference, entries, classifier
    )
    summary = to_jsonable(summary)
    if out_dir is not None:
        first_seed = next(iter(scored[GENERATED].values()))[1]
        _write_outputs(Path(out_dir), summary, reference, first_seed)
    return summary


def _summary(
    protocol: GenerationProtocol,
    split: CellSplit,
    condition_col: str,
    classifier_col: str,
    space: _Space,
    reference: Mapping[str, CellSet],
    entries: Mapping[str, Mapping[int | None, dict]],
    classifier: _Classifier,
) -> dict:
    """The summary: protocol, cells, per-method results (means over seeds), seeds, notes."""
    methods = {name: combine(reps) for name, reps in entries.items()}
    ref_pcs, ref_labels = _pooled(reference)
    auto = protocol.min_cells == MIN_CELLS_AUTO
    floor = min_cells_floor(protocol.knn_k)
    rule = f"smallest condition's reference cells, clamped to [{floor}, {MIN_CELLS_CAP}]"
    return {
        "protocol": protocol.as_dict(),
        "min_cells": {"used": split.min_cells, "auto": auto, "rule": rule if auto else "given"},
        "condition_col": condition_col,
        "conditions": split.conditions,
        "skipped_conditions": split.skipped,
        "cell_roles": split.roles,
        "n_genes_aligned": len(space.genes),
        "n_genes_used": len(space.hvg),
        "n_pcs_used": int(space.pca.components.shape[0]),
        "n_reference_cells": {c: len(r.pcs) for c, r in reference.items()},
        "methods": methods,
        "seeds": _seeds_section(entries),
        "silhouette_real": m.silhouette_by_condition(
            ref_pcs, ref_labels, protocol.silhouette_max_cells, protocol.seed
        ),
        "classifier": {
            "column": classifier_col,
            "trained_on": split.roles["fit"],
            "n_train_cells": classifier.n_train_cells,
            "n_classes": classifier.n_classes,
            "reference_accuracy": classifier.reference_accuracy,
            "accuracy": {n: v["pooled"]["classifier_accuracy"] for n, v in methods.items()},
        },
        "notes": NOTES,
    }


def _seeds_section(entries: Mapping[str, Mapping[int | None, dict]]) -> dict:
    """Mean, sd and per-seed values of the methods scored per sampling seed."""
    return {
        "column": SEED_COL,
        "methods": {name: seed_report(reps) for name, reps in entries.items() if None not in reps},
        "note": f"methods whose cells carry several obs['{SEED_COL}'] values are scored per "
        "seed against the same real cells; `methods` holds their means, sd is the sample sd "
        "(ddof=1) over seeds; the PCA figure shows the first seed's generated cells",
    }


NOTES = {
    GAUSSIAN: "gene-level metrics use samples mapped back through the real PCA "
    "loadings + mean, clipped at 0; zero fractions count clipped entries; its classifier "
    "label is its condition's (accuracy null when a condition's fit cells carry several)",
    CEILING: "real vs real (train cells if train given, else the other split half); "
    "its classifier accuracy is the accuracy on held-out real cells",
    "silhouette_by_condition": "pooled cells of each method in the real PCA space; "
    "compare with silhouette_real",
    "distance_to_training_ratio": "median nearest-training-cell distance of a "
    "method's cells over that of held-out real cells; ~1 = no memorization, << 1 = "
    "copies of training cells; only with train, not for the ceiling (its own cells)",
}


def to_jsonable(value):
    """Plain Python types for JSON; nan and infinities become None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def bar_scores(summary: Mapping) -> dict[str, dict[str, float | None]]:
    """Macro and pooled metrics of each method, flattened (for the chart and the CLI table)."""
    return {
        name: {**entry["macro"], **entry["pooled"]} for name, entry in summary["methods"].items()
    }


def _write_outputs(
    out_dir: Path,
    summary: dict,
    reference: Mapping[str, CellSet],
    generated: Mapping[str, CellSet],
) -> None:
    """``summary.json`` (temp file, then rename) and the two figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_pca_panels(
        {c: s.pcs for c, s in reference.items()},
        {c: s.pcs for c, s in generated.items()},
        out_dir / PCA_FIGURE,
    )
    plot_metric_bars(bar_scores(summary), out_dir / BARS_FIGURE)
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
