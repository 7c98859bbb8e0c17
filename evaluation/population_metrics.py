"""How close a predicted perturbed population is to the real one, as pure functions.

Inputs are log1p-normalized expression (cells x genes) of the predicted cells, the real
perturbed cells and the real controls they start from. The shift metrics compare mean
shifts from the controls (what a perturbation does), on all genes and on the real top-k
differentially expressed genes (all-gene agreement saturates: most genes do not move):

- ``pearson_delta``: Pearson r of predicted vs real mean shift (cell-eval's name);
- ``pearson_delta_top``: the same on the k genes with the largest real |shift|;
- ``r2_means_top``: R^2 of the predicted vs real gene means on those k genes (1 - SSE/SST
  around the real means' average, so a prediction can score below 0);
- ``energy``: energy distance between predicted and real cells in a PCA fitted on real cells
  only (``energy_in_pca``), which sees spread and shape as well as the mean.
"""

from __future__ import annotations

import numpy as np

from . import metrics

__all__ = ["energy_in_pca", "shift_metrics", "top_genes"]


def top_genes(real: np.ndarray, control: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` genes with the largest |real mean shift|, largest first."""
    shift = real.mean(0) - control.mean(0)
    return np.argsort(-np.abs(shift), kind="stable")[: min(k, len(shift))]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() <= 1e-12 or b.std() <= 1e-12:
        return float("nan")  # a constant shift has no direction to agree with
    return float(np.corrcoef(a, b)[0, 1])


def _r2(target: np.ndarray, prediction: np.ndarray) -> float:
    total = float(((target - target.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    return 1.0 - float(((target - prediction) ** 2).sum()) / total


def shift_metrics(
    pred: np.ndarray, real: np.ndarray, control: np.ndarray, k: int = 100
) -> dict[str, float]:
    """``pearson_delta``, ``pearson_delta_top`` and ``r2_means_top`` (module docstring)."""
    base = control.mean(0)
    pred_mean, real_mean = pred.mean(0), real.mean(0)
    top = top_genes(real, control, k)
    return {
        "pearson_delta": _pearson(pred_mean - base, real_mean - base),
        "pearson_delta_top": _pearson(pred_mean[top] - base[top], real_mean[top] - base[top]),
        "r2_means_top": _r2(real_mean[top], pred_mean[top]),
    }


def energy_in_pca(pred: np.ndarray, real: np.ndarray, fit_on: np.ndarray, n_pcs: int = 50) -> float:
    """Energy distance of ``pred`` to ``real`` after projecting both on the top ``n_pcs``
    principal components of ``fit_on`` (real cells only, centred on their mean)."""
    mean = fit_on.mean(0)
    _, _, vt = np.linalg.svd(fit_on - mean, full_matrices=False)
    components = vt[: min(n_pcs, vt.shape[0])]
    return float(
        metrics.energy_distance((pred - mean) @ components.T, (real - mean) @ components.T)
    )
