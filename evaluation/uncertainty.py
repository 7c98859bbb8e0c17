"""Is a predicted perturbed population as variable as the real one, and is the model's
uncertainty about its mean calibrated?

Inputs are log1p-normalized expression (cells x genes) of one perturbation in one cell type.
Mean-matching metrics (cell-eval's, ``population_metrics``) reward a model that predicts every
cell at the population mean; these two do not:

- ``variance_r2``: per-gene variance of the predicted cells against the real cells', R² about
  the identity. Published perturbation models score it below 0: their cells collapse towards
  the mean, so every variance is too small.
- ``mean_coverage``: M predicted populations ("members", e.g. predictions from M independent
  draws of control cells), each of the real population's size n; per gene, the central
  ``level`` interval of the M member means; the fraction of genes whose real mean lies inside.
  The real mean is itself an average of n cells, so a member drawn from the true distribution
  with the same n is exchangeable with it: the real mean's rank among the M + 1 means is
  uniform, and the interval covers it at ``level``. Members that collapse (no spread) cover
  far less; members too spread out cover more. ``interval_width`` says which.

Quantiles use ``np.quantile(..., method="weibull")`` (position q (M + 1)), not numpy's
default linear one (q (M - 1) + 1): for exchangeable values the weibull interval covers a new
value at ``level``, the linear one at less (M = 20: 0.82, M = 40: 0.86, measured on Gaussian
members). With few members the interval cannot reach ``level``: ``calibrated_coverage`` is
what an exchangeable model gets (M = 5: 0.67).
"""

from __future__ import annotations

import numpy as np

METHOD = "weibull"  # np.quantile method: exchangeable values are covered at ``level``

__all__ = [
    "METHOD",
    "calibrated_coverage",
    "interval_width",
    "mean_coverage",
    "member_means",
    "quantile_interval",
    "score_group",
    "variance_r2",
]


def _cells(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected cells x genes with >= 2 cells, got shape {x.shape}")
    return x


def _same_genes(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{names}: {a.shape[-1]} vs {b.shape[-1]} genes")


def variance_r2(predicted, real) -> float:
    """R² of the per-gene variances (ddof 1) of ``predicted`` against ``real``'s, about the
    identity: 1 - sum((v_pred - v_real)²) / sum((v_real - mean(v_real))²). Catches what mean
    metrics miss: a prediction collapsed to its mean has v_pred ≈ 0 and scores below 0. NaN
    when every real variance is the same (nothing to explain)."""
    predicted, real = _cells(predicted, "predicted"), _cells(real, "real")
    _same_genes(predicted, real, "predicted vs real")
    v_pred, v_real = predicted.var(axis=0, ddof=1), real.var(axis=0, ddof=1)
    if np.all(v_real == v_real[0]):
        return float("nan")
    residual = np.sum((v_pred - v_real) ** 2)
    return float(1.0 - residual / np.sum((v_real - v_real.mean()) ** 2))


def member_means(members) -> np.ndarray:
    """(M, G) per-gene means of M members: a list of (n_i, G) arrays or one (M, n, G) array."""
    if isinstance(members, np.ndarray) and members.ndim == 3:
        means = np.asarray(members, dtype=np.float64).mean(axis=1)
    else:
        cells = [_cells(m, f"member {i}") for i, m in enumerate(members)]
        if not cells:
            raise ValueError("members: none given")
        if len({c.shape[1] for c in cells}) > 1:
            raise ValueError(
                f"members: different gene counts {sorted({c.shape[1] for c in cells})}"
            )
        means = np.stack([c.mean(axis=0) for c in cells])
    if means.shape[0] < 2:
        raise ValueError(f"members: an interval needs >= 2 members, got {means.shape[0]}")
    return means


def quantile_interval(
    means: np.ndarray, level: float = 0.9, method: str = METHOD
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, the central ``level`` interval of the (M, G) member means."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0, method=method)
    return low, high


def calibrated_coverage(n_members: int, level: float = 0.9) -> float:
    """The coverage an exchangeable model expects with ``n_members`` members (weibull
    quantiles): the interval spans ranks q (M + 1) to (1 - q) (M + 1), clipped to 1..M, of
    the M + 1 means the real one is uniformly among. ``level`` once M >= 2 / (1 - level) - 1."""
    tail = (1.0 - level) / 2.0
    low = min(max(tail * (n_members + 1), 1.0), n_members)
    high = min(max((1.0 - tail) * (n_members + 1), 1.0), n_members)
    return float((high - low) / (n_members + 1))


def mean_coverage(members, real, level: float = 0.9, method: str = METHOD) -> float:
    """Fraction of genes whose real mean lies inside (inclusive) the central ``level``
    interval of the member means. ``members``: M predicted populations, each with as many cells
    as ``real`` (the caller's duty: the interval must carry the real mean's sampling noise)."""
    means = member_means(members)
    real = _cells(real, "real")
    _same_genes(means, real, "members vs real")
    low, high = quantile_interval(means, level, method)
    target = real.mean(axis=0)
    return float(np.mean((target >= low) & (target <= high)))


def interval_width(members, level: float = 0.9, method: str = METHOD) -> float:
    """Mean over genes of the ``level`` interval's width (log1p units): small with low
    coverage is overconfidence, large with high coverage is vagueness."""
    low, high = quantile_interval(member_means(members), level, method)
    return float(np.mean(high - low))


def score_group(
    members, real, level: float = 0.9, variance_of=None, method: str = METHOD
) -> dict[str, float]:
    """One group's scores: ``variance_r2`` of ``variance_of`` (default the first member)
    against ``real``, ``coverage_<level%>`` and ``interval_width``."""
    means = member_means(members)
    real = _cells(real, "real")
    _same_genes(means, real, "members vs real")
    low, high = quantile_interval(means, level, method)
    target = real.mean(axis=0)
    first = members[0] if variance_of is None else variance_of
    return {
        "variance_r2": variance_r2(first, real),
        f"coverage_{round(level * 100)}": float(np.mean((target >= low) & (target <= high))),
        "interval_width": float(np.mean(high - low)),
    }
