"""The seed designs' scoreboards for perturbation predictions: pure functions on arrays.

Seed 003 (the conditional VAE) judges a prediction in GENE space, on log1p(normalize_total)
expression: the mean shift of a perturbation (its cells' mean minus the control cells' mean, per
gene) predicted vs real, by Pearson r and by the Jaccard index of the top-K genes by |shift|.
Seed 004 (latent-shift predictors) judges it in an EMBEDDING space: the per-perturbation mean
embedding (R², MSE), the cells' distribution (energy distance) and where predicted cells land
among real ones (kNN purity). ``perturbation_scoreboard`` computes both for one method, so the
model and the training-mean baseline go through the same function and can be compared.

Choices (the scoreboard's ``settings`` and ``embedding`` record them):
- Both shifts are taken against REAL's control cells, so only the perturbed cells of a
  prediction matter.
- Embedding by default: PCA (at most 50 components) fitted on REAL's cells, perturbed and
  control. In-sample, unlike the split-half PCA of ``perturbation.energy_distances``: this is
  the seeds' definition, and its energy distances are not comparable with that one's. A caller
  may pass ``embed`` (e.g. a VAE encoder): dense log1p expression (n, genes) -> (n, d).
- Embedding-space metrics use at most ``max_cells`` seeded cells per group and side.
- ``embedding_r2`` is ONE number over perturbations x dimensions (see its docstring); the
  others are per perturbation, macro-averaged over the perturbations where defined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.metrics import _pearson, energy_distance
from latentcell.evaluation.splits import shuffled_rows

JACCARD_KS = (25, 50, 100)
PURITY_KS = (10, 20, 50)


def mean_shift_pearson(pred_delta: np.ndarray, true_delta: np.ndarray) -> float:
    """Pearson r over genes between the predicted and the real mean shift of one perturbation.

    Why: it asks whether the model moves the right genes in the right direction, whatever the
    shift's size. 1 is perfect, -1 the reverse shift; nan when a shift is constant. With REAL's
    controls in the prediction file it equals cell-eval's ``pearson_delta``.
    """
    pred_delta, true_delta = np.ravel(pred_delta), np.ravel(true_delta)
    if pred_delta.shape != true_delta.shape:
        raise ValueError(f"shifts differ in length: {pred_delta.shape} vs {true_delta.shape}")
    return _pearson(pred_delta, true_delta)


def top_k_genes(delta: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` genes with the largest |delta|; equal |delta| go to the lower
    index (a stable sort), so the set is deterministic. ``k`` is clipped to the gene count."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    delta = np.ravel(np.asarray(delta, dtype=np.float64))
    if not np.isfinite(delta).all():
        raise ValueError("shifts must be finite")
    return np.argsort(-np.abs(delta), kind="stable")[: min(k, delta.size)]


def top_k_jaccard(pred_delta: np.ndarray, true_delta: np.ndarray, k: int) -> float:
    """Jaccard index |P & T| / |P | T| of the top-``k`` genes by |shift|, predicted vs real.

    Why: a handful of strongly moved genes carry most of a perturbation's biology, and r over
    all genes can hide them. 1 is the same set, 0 disjoint. ``k`` >= the number of genes is
    clipped to it (both sets are then every gene: 1). Ties: see ``top_k_genes``.
    """
    if np.size(pred_delta) != np.size(true_delta):
        raise ValueError("shifts differ in length")
    pred, true = top_k_genes(pred_delta, k), top_k_genes(true_delta, k)
    inter = np.intersect1d(pred, true).size
    return float(inter / (2 * pred.size - inter))


def embedding_r2(pred_means: np.ndarray, true_means: np.ndarray) -> float:
    """R² of the predicted per-perturbation mean embeddings, (n_perts, d) rows aligned.

    Defined over perturbations x dimensions: ``1 - sum (t - p)² / sum (t - t̄_d)²`` with
    ``t̄_d`` the mean over perturbations of dimension d (sklearn's ``r2_score`` with
    ``multioutput="variance_weighted"``). Why not one R² per perturbation over dimensions: that
    depends on where the embedding's origin is (a VAE latent is not centred) and a constant
    prediction can score near 1. Here the mean over perturbations scores exactly 0 and ANY
    prediction that is the same for every perturbation (the training-mean baseline, the global
    mean) scores <= 0: the number says how much of the differences between perturbations is
    predicted. 1 is perfect; nan with fewer than 2 perturbations (nothing to explain).
    """
    pred, true = np.atleast_2d(pred_means), np.atleast_2d(true_means)
    if pred.shape != true.shape:
        raise ValueError(f"mean embeddings differ in shape: {pred.shape} vs {true.shape}")
    ss_tot = float(((true - true.mean(axis=0)) ** 2).sum())
    ss_res = float(((true - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def embedding_mse(pred_means: np.ndarray, true_means: np.ndarray) -> float:
    """Mean squared error between predicted and real mean embeddings: over dimensions for one
    perturbation's (d,) vectors, over perturbations x dimensions for (n_perts, d) arrays.

    Why: R² is relative to how different the perturbations are; the MSE is the absolute miss
    in the embedding's own units. 0 is perfect; lower is better.
    """
    pred, true = np.asarray(pred_means, np.float64), np.asarray(true_means, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"mean embeddings differ in shape: {pred.shape} vs {true.shape}")
    return float(((pred - true) ** 2).mean())


def embedding_energy_distance(pred_emb: np.ndarray, true_emb: np.ndarray) -> float:
    """Energy distance between predicted and real cells of one perturbation, (n, d) and (m, d)
    (``metrics.energy_distance``). Why: the means can match while the spread is wrong (a
    model that predicts copies of the mean); this sees the whole distribution. 0 is perfect."""
    return energy_distance(pred_emb, true_emb)


def neighbour_labels(pred_emb: np.ndarray, true_emb: np.ndarray, true_labels, k: int):
    """(n_pred, k) labels of each predicted cell's ``k`` nearest real cells (Euclidean),
    nearest first; ``k`` is clipped to the number of real cells."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(true_emb))
    _, idx = NearestNeighbors(n_neighbors=k).fit(true_emb).kneighbors(pred_emb)
    return np.asarray(true_labels)[idx]


def knn_purity(pred_emb, pred_labels, true_emb, true_labels, k: int) -> float:
    """The seeds' kNN purity: for each predicted cell the fraction of its ``k`` nearest REAL
    cells whose perturbation equals its own, averaged over predicted cells.

    Why: high only when predictions land among the real cells of their own perturbation, not
    merely near the population; about 1/n_labels for predictions that carry no information
    about the label (balanced labels). 1 is perfect. ``k`` larger than the number of real cells
    is clipped to it (then every real cell is a neighbour). Ties in distance are broken by
    sklearn's neighbour search, deterministically for the same input.
    """
    same = neighbour_labels(pred_emb, true_emb, true_labels, k) == np.asarray(pred_labels)[:, None]
    return float(same.mean())


def mean_shifts(x, labels: np.ndarray, perturbations: Sequence[str], control_mean: np.ndarray):
    """(n_perts, n_genes): each perturbation's mean over its rows of ``x`` (dense or sparse)
    minus ``control_mean``."""
    return np.stack([_mean(x[labels == p]) - control_mean for p in perturbations])


def _mean(x) -> np.ndarray:
    return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()


def capped_rows(labels: np.ndarray, group: str, max_cells: int, seed: int, key: str):
    """At most ``max_cells`` rows of ``group``, a seeded subsample that depends only on
    (seed, key, group)."""
    return np.sort(shuffled_rows(np.asarray(labels), group, seed, key)[:max_cells])


def pca_embedding(fit_x, n_pcs: int, seed: int) -> tuple[Callable, int]:
    """A PCA fitted on ``fit_x`` (dense or sparse: arpack centres a sparse matrix implicitly,
    so it is never densified) and its number of components."""
    n = min(n_pcs, fit_x.shape[0] - 1, fit_x.shape[1] - 1)
    if n < 1:
        raise ValueError("the PCA needs at least 2 cells and 2 genes")
    pca = PCA(n_components=n, svd_solver="arpack", random_state=seed).fit(fit_x)
    return pca.transform, n


def _embedded(embed: Callable, x) -> np.ndarray:
    """``embed`` on dense expression, its output checked: a user's callable can be wrong."""
    out = np.asarray(embed(x.toarray() if sp.issparse(x) else np.asarray(x)), dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != x.shape[0] or not np.isfinite(out).all():
        raise DataValidationError(
            "embed", "output", f"expected a finite ({x.shape[0]}, d) array, got shape {out.shape}",
            "make the embedding callable map (n_cells, n_genes) to finite (n_cells, d)",
        )  # fmt: skip
    return out


def perturbation_scoreboard(
    pred_x, pred_labels, real_x, real_labels, control_x, embed: Callable | None = None,
    ks: Sequence[int] = JACCARD_KS, purity_ks: Sequence[int] = PURITY_KS, n_pcs: int = 50,
    max_cells: int = 1000, seed: int = 0,
) -> dict:  # fmt: skip
    """Seeds 003 and 004's scoreboard of one method, from log1p expression (dense or sparse).

    ``pred_x``/``real_x`` hold perturbed cells only (labels per row), ``control_x`` REAL's
    control cells; every perturbation of REAL needs predicted cells. Returns
    ``per_perturbation`` (perturbation -> metric -> value), ``mean`` (macro over perturbations
    where defined; ``embedding_r2`` over all of them), ``degenerate`` (metric -> why its value
    says nothing for this input), ``embedding`` and ``settings``. Metric keys:
    ``mean_shift_pearson``, ``jaccard_top{K}``, ``embedding_r2``, ``embedding_mse``,
    ``embedding_energy_distance``, ``knn_purity_k{k}``.
    """
    pred_labels, real_labels = np.asarray(pred_labels, str), np.asarray(real_labels, str)
    perts = sorted(set(real_labels))
    if not perts or set(pred_labels) != set(perts):
        raise ValueError(f"pred and real must hold the same perturbations, got {len(perts)} real")
    control_mean = _mean(control_x)
    true_d = mean_shifts(real_x, real_labels, perts, control_mean)
    pred_d = mean_shifts(pred_x, pred_labels, perts, control_mean)
    per = {
        p: {
            "mean_shift_pearson": mean_shift_pearson(pred_d[i], true_d[i]),
            **{f"jaccard_top{k}": top_k_jaccard(pred_d[i], true_d[i], k) for k in ks},
        }
        for i, p in enumerate(perts)
    }
    cells = (pred_x, pred_labels, real_x, real_labels, control_x, perts)
    r2, description = _embedding_metrics(per, *cells, embed, purity_ks, n_pcs, max_cells, seed)
    mean = {name: _macro([per[p][name] for p in perts]) for name in per[perts[0]]}
    mean["embedding_r2"] = r2
    degenerate = {}
    if len(perts) < 2:
        degenerate["embedding_r2"] = "one perturbation: no differences between them to explain"
        for k in purity_ks:
            degenerate[f"knn_purity_k{k}"] = "one perturbation: every neighbour has its label"
        mean.update(dict.fromkeys(degenerate))
    return {
        "perturbations": perts,
        "per_perturbation": per,
        "mean": mean,
        "degenerate": degenerate,
        "embedding": description,
        "settings": {
            "jaccard_ks": list(ks),
            "purity_ks": list(purity_ks),
            "max_cells": max_cells,
            "seed": seed,
            "control": "REAL's control cells: the mean both shifts are taken against",
            "purity_pool": "REAL's perturbed cells (controls left out: chance is about "
            "1/n_perturbations however many control cells REAL has)",
        },
    }


def _embedding_metrics(
    per, pred_x, pred_labels, real_x, real_labels, control_x, perts, embed, purity_ks,
    n_pcs, max_cells, seed,
) -> tuple[float, str]:  # fmt: skip
    """Adds seed 004's per-perturbation metrics to ``per``; returns (R², the embedding)."""
    real_rows = {p: capped_rows(real_labels, p, max_cells, seed, "real") for p in perts}
    pred_rows = {p: capped_rows(pred_labels, p, max_cells, seed, "pred") for p in perts}
    description = "caller's embedding of log1p expression"
    if embed is None:
        ctrl = np.sort(np.random.default_rng(seed).permutation(control_x.shape[0])[:max_cells])
        parts = [real_x[real_rows[p]] for p in perts] + [control_x[ctrl]]
        fit_x = sp.vstack(parts).tocsr() if sp.issparse(real_x) else np.vstack(parts)
        embed, n = pca_embedding(fit_x, n_pcs, seed)
        description = (
            f"PCA-{n} of log1p expression fitted on REAL's cells (perturbed and control, at "
            f"most {max_cells} per group)"
        )
    true_e = {p: _embedded(embed, real_x[real_rows[p]]) for p in perts}
    pred_e = {p: _embedded(embed, pred_x[pred_rows[p]]) for p in perts}
    pool = np.concatenate([true_e[p] for p in perts])
    pool_labels = np.concatenate([[p] * len(true_e[p]) for p in perts])
    true_means = np.stack([true_e[p].mean(axis=0) for p in perts])
    pred_means = np.stack([pred_e[p].mean(axis=0) for p in perts])
    for i, p in enumerate(perts):
        per[p]["embedding_mse"] = embedding_mse(pred_means[i], true_means[i])
        per[p]["embedding_energy_distance"] = embedding_energy_distance(pred_e[p], true_e[p])
        same = neighbour_labels(pred_e[p], pool, pool_labels, max(purity_ks)) == p
        for k in purity_ks:  # neighbours come nearest first: the k nearest are a prefix
            per[p][f"knn_purity_k{k}"] = float(same[:, :k].mean())
    return embedding_r2(pred_means, true_means), description


def _macro(values: list[float]) -> float | None:
    """Mean over the perturbations where the value is defined; None where it is nowhere."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None
