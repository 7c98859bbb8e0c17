"""Figures of a generation evaluation, drawn with matplotlib's Agg canvas (no display needed).

Each figure is written to a temporary file beside its destination and renamed into place, so a
reader never sees half a PNG. ``pyplot`` is not used: no global state, no backend selection.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Metrics shown in the bar chart: (key, label with the better direction).
BAR_METRICS: tuple[tuple[str, str], ...] = (
    ("mmd", "MMD (lower)"),
    ("energy_distance", "energy distance (lower)"),
    ("wasserstein", "W2 (lower)"),
    ("knn_auc", "kNN AUC (0.5 best)"),
    ("precision", "precision (higher)"),
    ("recall", "recall (higher)"),
    ("density", "density (1 best)"),
    ("coverage", "coverage (higher)"),
    ("mean_pearson", "mean Pearson (higher)"),
    ("var_pearson", "variance Pearson (higher)"),
    ("zero_frac_mae", "zero-fraction MAE (lower)"),
    ("per_gene_wasserstein", "per-gene W1 (lower)"),
    ("silhouette_by_condition", "silhouette (match real)"),
    ("classifier_accuracy", "classifier accuracy (higher)"),
)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_pca_panels(
    real: Mapping[str, np.ndarray], generated: Mapping[str, np.ndarray], path: Path
) -> None:
    """One panel per condition: real and generated cells on PC1/PC2 of the real PCA."""
    conditions = list(real)
    ncols = min(4, max(1, len(conditions)))
    nrows = math.ceil(len(conditions) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, cond in zip(axes.ravel(), conditions, strict=False):
        r = real[cond]
        ax.scatter(r[:, 0], r[:, 1 % r.shape[1]], s=4, alpha=0.5, label="real", color="tab:blue")
        g = generated.get(cond)
        if g is not None:
            ax.scatter(
                g[:, 0], g[:, 1 % g.shape[1]], s=4, alpha=0.5, label="generated", color="tab:red"
            )
        ax.set_title(str(cond), fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    for ax in axes.ravel()[len(conditions) :]:
        ax.set_axis_off()
    axes[0, 0].legend(fontsize=7, markerscale=3)
    _save(fig, path)


def plot_metric_bars(
    scores: Mapping[str, Mapping[str, float | None]], path: Path, metrics: Sequence = BAR_METRICS
) -> None:
    """One bar panel per metric, one bar per method (``scores[method][metric]``)."""
    methods = list(scores)
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(methods))]
    for ax, (key, label) in zip(axes.ravel(), metrics, strict=False):
        values = [scores[m].get(key) for m in methods]
        heights = [np.nan if v is None else float(v) for v in values]
        ax.bar(range(len(methods)), heights, color=colors)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    for ax in axes.ravel()[len(metrics) :]:
        ax.set_axis_off()
    _save(fig, path)
