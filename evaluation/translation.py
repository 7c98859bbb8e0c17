"""Scoring RNA <-> protein translation on held-out cells, and the baseline it must beat.

Both modalities are compared on log1p(count / library * 1e4), each cell normalized by its
own library of that modality (for RNA, the sum over the genes scored), so depth does not
count. A feature's score is the Pearson r of predicted against measured values across the
held-out cells: it asks whether the translation orders the cells right for that protein or
gene, whatever its scale. A feature constant in either (a gene never detected in the
held-out cells) has no r and is left out of the means (and counted).

The baseline is ridge regression from one modality's normalized values to the other's,
fitted on the training cells only: a linear map is what a reviewer reaches for first, and on a
few hundred cells it is hard to beat. The penalty is chosen per target feature among
``RIDGE_ALPHAS`` by leave-one-out error on the training cells (sklearn ``RidgeCV``), so the
baseline is tuned as a practitioner would tune it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RIDGE_ALPHAS", "column_pearson", "log1p_normalized", "ridge_translate", "summary"]

TARGET_SUM = 1e4
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


def log1p_normalized(counts: np.ndarray) -> np.ndarray:
    """log1p(counts / row sum * 1e4); an empty row stays zeros."""
    counts = np.asarray(counts, np.float64)
    library = np.maximum(counts.sum(1, keepdims=True), 1.0)
    return np.log1p(counts / library * TARGET_SUM)


def column_pearson(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``pred`` with the same column of ``real``, across rows;
    NaN where either column is constant."""
    pred = np.asarray(pred, np.float64) - np.mean(pred, 0)
    real = np.asarray(real, np.float64) - np.mean(real, 0)
    norm = np.sqrt((pred**2).sum(0) * (real**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pred * real).sum(0) / norm
    return np.where(norm > 1e-12, r, np.nan)


def summary(r: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """mean and median of the finite r (of the ``keep`` features), and how many."""
    r = np.asarray(r, np.float64) if keep is None else np.asarray(r, np.float64)[keep]
    finite = r[np.isfinite(r)]
    if not len(finite):
        return {"mean": None, "median": None, "n": 0, "n_undefined": int(len(r))}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)),
            "n": int(len(finite)), "n_undefined": int(len(r) - len(finite))}  # fmt: skip


def ridge_translate(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Ridge regression of ``train_y`` on ``train_x`` (a penalty per target column, chosen by
    leave-one-out error), applied to ``test_x``."""
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True)
    return model.fit(train_x, train_y).predict(test_x)
