"""Seed 003's three-panel figure of a perturbation prediction, drawn with matplotlib's Agg canvas.

1. the predicted against the real mean shift of every gene, pooled over perturbations (one
   colour per perturbation up to ten), with the pooled Pearson r and the per-perturbation mean
   r of the scoreboard in the title;
2. the top-K Jaccard index J(K) against K: the mean over perturbations, each perturbation's
   value as a dot, and the baseline's mean when one is given;
3. REAL's and the predicted perturbed cells on the first two components of a PCA fitted on
   REAL's perturbed cells only (the cells the panel shows), at most ``max_cells`` per group.

``draw_scoreboard`` only draws (arrays in, ``Figure`` out); ``write_scoreboard_figure`` derives
the arrays from expression and writes the PNG the way ``figures`` does (temporary file, rename).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from matplotlib.figure import Figure

from latentcell.evaluation import scoreboards as sb
from latentcell.evaluation.figures import _save
from latentcell.evaluation.metrics import _pearson

MAX_POINTS = 20_000  # points drawn in panel 1; r is computed on every gene


def jaccard_by_k(scoreboard: Mapping) -> dict[int, list[float]]:
    """K -> each perturbation's J(K), from a ``perturbation_scoreboard`` result."""
    per = scoreboard["per_perturbation"]
    return {
        k: [per[p][f"jaccard_top{k}"] for p in per] for k in scoreboard["settings"]["jaccard_ks"]
    }


def draw_scoreboard(
    pred_delta: np.ndarray,
    true_delta: np.ndarray,
    perturbations: Sequence[str],
    jaccard: Mapping[int, Sequence[float]],
    true_pcs: np.ndarray,
    pred_pcs: np.ndarray,
    mean_r: float | None = None,
    baseline_jaccard: Mapping[int, Sequence[float]] | None = None,
    seed: int = 0,
) -> Figure:
    """The figure from its arrays: shifts (n_perts, n_genes), J(K) per perturbation, and the
    cells' PC1/PC2 coordinates (real, predicted)."""
    fig = Figure(figsize=(13.5, 4.2), layout="constrained")
    ax_shift, ax_jac, ax_pca = fig.subplots(1, 3)

    pooled_r = _pearson(np.ravel(pred_delta), np.ravel(true_delta))
    rng = np.random.default_rng(seed)
    n_genes = true_delta.shape[1]
    per_pert = max(1, MAX_POINTS // max(1, len(perturbations)))
    for i, pert in enumerate(perturbations):
        genes = np.sort(rng.permutation(n_genes)[:per_pert])
        color = f"C{i}" if len(perturbations) <= 10 else "tab:blue"
        label = str(pert) if len(perturbations) <= 10 else None
        ax_shift.scatter(
            true_delta[i, genes], pred_delta[i, genes], s=3, alpha=0.4, color=color, label=label
        )
    lo = float(min(true_delta.min(), pred_delta.min()))
    hi = float(max(true_delta.max(), pred_delta.max()))
    ax_shift.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    title = f"mean shift per gene, pooled r = {pooled_r:.3f}"
    if mean_r is not None:
        title += f"\nmean r over perturbations = {mean_r:.3f}"
    ax_shift.set_title(title, fontsize=9)
    ax_shift.set_xlabel("real Δ (log1p)")
    ax_shift.set_ylabel("predicted Δ (log1p)")
    if len(perturbations) <= 10:
        ax_shift.legend(fontsize=6, markerscale=3)

    ks = sorted(jaccard)
    for k in ks:
        values = np.asarray(jaccard[k], dtype=np.float64)
        ax_jac.scatter(np.full(len(values), k), values, s=10, alpha=0.5, color="tab:blue")
    means = [float(np.mean(jaccard[k])) for k in ks]
    ax_jac.plot(ks, means, marker="o", color="tab:blue", label="prediction (mean)")
    if baseline_jaccard is not None:
        base = [float(np.mean(baseline_jaccard[k])) for k in ks]
        ax_jac.plot(ks, base, marker="s", ls="--", color="tab:grey", label="baseline (mean)")
    ax_jac.set_xticks(ks)
    ax_jac.set_ylim(-0.02, 1.02)
    ax_jac.set_xlabel("K (top genes by |Δ|)")
    ax_jac.set_ylabel("Jaccard J(K)")
    ax_jac.set_title("top-K gene overlap; dots: perturbations", fontsize=9)
    ax_jac.legend(fontsize=7)

    second = 1 % true_pcs.shape[1]
    ax_pca.scatter(true_pcs[:, 0], true_pcs[:, second], s=4, alpha=0.5, color="tab:blue")
    ax_pca.scatter(pred_pcs[:, 0], pred_pcs[:, second], s=4, alpha=0.5, color="tab:red")
    ax_pca.legend(["real", "predicted"], fontsize=7, markerscale=3)
    ax_pca.set_xlabel("PC1")
    ax_pca.set_ylabel("PC2")
    ax_pca.set_title("perturbed cells, PCA fitted on real", fontsize=9)
    return fig


def write_scoreboard_figure(
    path: str | Path,
    pred_x,
    pred_labels: np.ndarray,
    real_x,
    real_labels: np.ndarray,
    control_x,
    scoreboard: Mapping,
    baseline: Mapping | None = None,
) -> Path:
    """Seed 003's figure of one prediction (the arrays as for ``perturbation_scoreboard``,
    ``scoreboard`` its result; ``baseline`` another method's result, for panel 2). Returns the
    PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pred_labels, real_labels = np.asarray(pred_labels, str), np.asarray(real_labels, str)
    perts = scoreboard["perturbations"]
    max_cells, seed = scoreboard["settings"]["max_cells"], scoreboard["settings"]["seed"]
    control_mean = np.asarray(control_x.mean(axis=0), dtype=np.float64).ravel()
    true_delta = sb.mean_shifts(real_x, real_labels, perts, control_mean)
    pred_delta = sb.mean_shifts(pred_x, pred_labels, perts, control_mean)
    real_rows = np.concatenate(
        [sb.capped_rows(real_labels, p, max_cells, seed, "real") for p in perts]
    )
    pred_rows = np.concatenate(
        [sb.capped_rows(pred_labels, p, max_cells, seed, "pred") for p in perts]
    )
    fit = real_x[real_rows]
    embed, _ = sb.pca_embedding(sp.csr_matrix(fit) if sp.issparse(fit) else fit, 2, seed)
    fig = draw_scoreboard(
        pred_delta,
        true_delta,
        perts,
        jaccard_by_k(scoreboard),
        _as_pcs(embed, fit),
        _as_pcs(embed, pred_x[pred_rows]),
        mean_r=scoreboard["mean"].get("mean_shift_pearson"),
        baseline_jaccard=None if baseline is None else jaccard_by_k(baseline),
        seed=seed,
    )
    _save(fig, path)
    return path


def _as_pcs(embed, x) -> np.ndarray:
    return np.asarray(embed(x.toarray() if sp.issparse(x) else x), dtype=np.float64)
