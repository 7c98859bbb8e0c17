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
``gaussian_pca`` and the condition classifier; the classifier's accuracy on the reference cells
(held-out real) is reported as the ceiling's own accuracy, since the ceiling's cells are the
classifier's training cells.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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
    GenerationProtocol,
    RealPCA,
    check_input,
    condition_labels,
    counts_matrix,
    log_normalize,
    reference_genes,
    rng_for,
    select_hvgs,
)
from latentcell.evaluation.splits import shuffled_rows, split_cells

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
    """Cells of one condition: PCA scores and log1p expression on the HVGs, row-aligned."""

    pcs: np.ndarray
    expr: np.ndarray

    def head(self, n: int) -> CellSet:
        """The first ``n`` cells (rows were shuffled when drawn, so this is a random subset)."""
        return CellSet(self.pcs[:n], self.expr[:n])


def _model_rows(
    adata: ad.AnnData,
    source: str,
    condition_col: str,
    conditions: list[str],
    protocol: GenerationProtocol,
) -> dict[str, np.ndarray]:
    """Shuffled, capped rows per evaluated condition; every condition needs min_cells cells."""
    labels = condition_labels(adata, condition_col)
    rows = {
        c: shuffled_rows(labels, c, protocol.seed, source)[: protocol.max_cells_per_condition]
        for c in conditions
    }
    short = {c: len(r) for c, r in rows.items() if len(r) < protocol.min_cells}
    if short:
        cond, n = next(iter(short.items()))
        raise DataValidationError(
            source,
            f"obs['{condition_col}']",
            f"{len(short)} evaluated condition(s) have fewer than min_cells="
            f"{protocol.min_cells} cells (e.g. {cond!r}: {n})",
            "generate at least min_cells cells for every condition of the real data",
        )
    return rows


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


def _project(expr: Mapping[str, np.ndarray], pca: RealPCA) -> dict[str, CellSet]:
    return {c: CellSet(pca.transform(e), e) for c, e in expr.items()}


def _gaussian_sets(
    fit: Mapping[str, CellSet],
    sizes: Mapping[str, int],
    pca: RealPCA,
    protocol: GenerationProtocol,
) -> dict[str, CellSet]:
    """Per-condition Gaussian samples in PCA space; expression decoded and clipped at 0."""
    out = {}
    for cond, n in sizes.items():
        cells = fit.get(cond)
        if cells is None or len(cells.pcs) < protocol.min_cells:
            continue
        mean = cells.pcs.mean(axis=0)
        cov = np.atleast_2d(np.cov(cells.pcs, rowvar=False))
        rng = rng_for(protocol.seed, GAUSSIAN, cond)
        z = rng.multivariate_normal(mean, cov, size=n, method="eigh", check_valid="ignore")
        out[cond] = CellSet(z, np.clip(pca.inverse(z), 0.0, None))
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
    pcs = np.concatenate([s.pcs for s in sets.values()])
    labels = np.concatenate([[c] * len(s.pcs) for c, s in sets.items()])
    return pcs, labels


def evaluate_generation(
    generated: ad.AnnData,
    real: ad.AnnData,
    condition_col: str,
    *,
    train: ad.AnnData | None = None,
    baselines: Mapping[str, ad.AnnData] | None = None,
    protocol: GenerationProtocol = DEFAULT_PROTOCOL,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Score generated counts against real held-out counts; see the module docstring.

    Inputs are AnnData with raw counts in ``.X`` and ``obs[condition_col]``. Returns a
    JSON-serialisable summary (nan written as null); with ``out_dir``, also writes
    ``summary.json`` and two figures there. Bad input raises ``DataValidationError`` whose
    path is the input's role: ``real``, ``train``, ``generated`` or ``baseline NAME``.
    """
    baselines = dict(baselines or {})
    clash = [n for n in baselines if n in RESERVED_NAMES]
    if clash:
        raise DataValidationError(
            baseline_source(clash[0]), "name", "reserved method name", "rename the baseline"
        )
    check_input(real, "real", condition_col)
    genes = reference_genes(real, "real")
    if train is not None:
        train = check_input(train, "train", condition_col, genes)
    models = {GENERATED: (generated, GENERATED)}
    models.update({n: (a, baseline_source(n)) for n, a in baselines.items()})
    models = {
        name: (check_input(adata, source, condition_col, genes), source)
        for name, (adata, source) in models.items()
    }

    split = split_cells(real, train, condition_col, protocol)
    model_rows = {
        name: _model_rows(adata, source, condition_col, split.conditions, protocol)
        for name, (adata, source) in models.items()
    }
    hvg = select_hvgs(counts_matrix(split.hvg.data, genes, split.hvg.rows), protocol.n_hvg)
    pca_counts = counts_matrix(split.pca.data, genes, split.pca.rows)
    pca = RealPCA.fit(log_normalize(pca_counts, hvg, protocol), protocol.n_pcs, protocol.seed)
    reference = _project(_expression(real, split.reference, genes, hvg, protocol), pca)
    fit = _project(_expression(split.fit_data, split.fit, genes, hvg, protocol), pca)

    method_cells: dict[str, Mapping[str, CellSet]] = {
        name: _project(_expression(models[name][0], rows, genes, hvg, protocol), pca)
        for name, rows in model_rows.items()
    }
    sizes = {c: len(r.pcs) for c, r in reference.items()}
    method_cells[GAUSSIAN] = _gaussian_sets(fit, sizes, pca, protocol)
    method_cells[CEILING] = fit

    train_cells = None  # every training cell of each condition, for the memorization check
    if train is not None:
        labels = condition_labels(train, condition_col)
        rows = {c: np.flatnonzero(labels == c)[:MEMORIZATION_MAX_TRAIN] for c in split.conditions}
        train_cells = _project(_expression(train, rows, genes, hvg, protocol), pca)

    ref_pcs, ref_labels = _pooled(reference)
    fit_scored = {c: s for c, s in fit.items() if len(s.pcs)}
    classifier = None
    if len(fit_scored) >= 2:
        classifier = m.fit_condition_classifier(*_pooled(fit_scored), seed=protocol.seed)
    reference_accuracy = (
        m.accuracy(classifier, ref_pcs, ref_labels) if classifier is not None else float("nan")
    )
    silhouette_real = m.silhouette_by_condition(
        ref_pcs, ref_labels, protocol.silhouette_max_cells, protocol.seed
    )

    methods, used_by_method = {}, {}
    for name, cells in method_cells.items():
        # the memorization check: not for the ceiling, whose cells are training cells
        per_condition, used = _score_method(
            reference, cells, protocol, None if name == CEILING else train_cells
        )
        used_by_method[name] = used
        pooled = {"silhouette_by_condition": float("nan"), "classifier_accuracy": float("nan")}
        if used:
            pcs, labels = _pooled(used)
            pooled["silhouette_by_condition"] = m.silhouette_by_condition(
                pcs, labels, protocol.silhouette_max_cells, protocol.seed
            )
            if name == CEILING:
                pooled["classifier_accuracy"] = reference_accuracy
            elif classifier is not None:
                pooled["classifier_accuracy"] = m.accuracy(classifier, pcs, labels)
        methods[name] = {"macro": _macro(per_condition), "pooled": pooled}
        methods[name]["per_condition"] = per_condition

    summary = {
        "protocol": protocol.as_dict(),
        "condition_col": condition_col,
        "conditions": split.conditions,
        "skipped_conditions": split.skipped,
        "cell_roles": split.roles,
        "n_genes_aligned": len(genes),
        "n_genes_used": len(hvg),
        "n_pcs_used": int(pca.components.shape[0]),
        "n_reference_cells": {c: int(n) for c, n in sizes.items()},
        "methods": methods,
        "silhouette_real": silhouette_real,
        "classifier": {
            "trained_on": split.roles["fit"],
            "n_train_cells": int(sum(len(s.pcs) for s in fit_scored.values())),
            "reference_accuracy": reference_accuracy,
            "accuracy": {n: v["pooled"]["classifier_accuracy"] for n, v in methods.items()},
        },
        "notes": {
            GAUSSIAN: "gene-level metrics use samples mapped back through the real PCA "
            "loadings + mean, clipped at 0; zero fractions count clipped entries",
            CEILING: "real vs real (train cells if train given, else the other split half); "
            "its classifier accuracy is the accuracy on held-out real cells",
            "silhouette_by_condition": "pooled cells of each method in the real PCA space; "
            "compare with silhouette_real",
            "distance_to_training_ratio": "median nearest-training-cell distance of a "
            "method's cells over that of held-out real cells; ~1 = no memorization, << 1 = "
            "copies of training cells; only with train, not for the ceiling (its own cells)",
        },
    }
    summary = to_jsonable(summary)
    if out_dir is not None:
        _write_outputs(Path(out_dir), summary, reference, used_by_method[GENERATED])
    return summary


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
