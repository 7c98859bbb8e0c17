"""Scores of the spatial benchmark: per-gene Pearson across spots and a layer classifier.

Per-gene Pearson: for each gene, r across the held-out spots of predicted against measured
log1p-normalized expression; genes constant in either are left out (r is undefined there, and
a method that predicts one value everywhere would otherwise score 0 or nan by accident); the
score is the mean r over the remaining genes.

Layer classifier: logistic regression on the first ``N_PCS`` principal components of the
training spots' log1p expression (genes scaled to unit variance, PCA fitted on the training
spots), trained on the training spots' real layers and applied unchanged to anything else.
"""

from __future__ import annotations

import numpy as np

N_PCS = 30


def per_gene_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """r per gene (columns) across spots (rows); nan where either side is constant."""
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    den = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / den
    r[~(den > 1e-12)] = np.nan
    return r


def mean_r(pred: np.ndarray, true: np.ndarray, genes: np.ndarray | None = None) -> float:
    r = per_gene_pearson(pred, true)
    r = r if genes is None else r[genes]
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


class LayerClassifier:
    """Scaler -> PCA -> logistic regression, fitted on real training spots."""

    def __init__(self, X: np.ndarray, layers: np.ndarray, seed: int = 0) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        n_pcs = min(N_PCS, X.shape[0] - 1, X.shape[1])
        self.model = make_pipeline(
            StandardScaler(),
            PCA(n_pcs, random_state=seed),
            LogisticRegression(max_iter=5000),
        )
        self.model.fit(X, layers)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X)

    def accuracy(self, X: np.ndarray, layers: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == layers))
