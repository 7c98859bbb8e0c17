"""Highly variable genes, Seurat v3 style (Stuart et al. 2019; scanpy ``flavor="seurat_v3"``).

On raw counts, in two streaming passes over CSR blocks (so 15 GB inputs never load whole):
  1. per-gene mean and variance (ddof=1) from running sums of x and x^2 (``GeneMoments``);
     fit log10(variance) against log10(mean) with a local quadratic regression (``loess``);
     the regularised standard deviation is ``sqrt(10**fit)``; each gene's values are clipped at
     ``mean + sqrt(n_cells) * reg_std``;
  2. running sums of the clipped values and their squares (``ClippedMoments``) give the
     normalised variance ``sum((min(x, clip) - mean)^2) / ((n - 1) * reg_std^2)``.
Genes are ranked by normalised variance (descending); the top ``n_top`` are selected. Genes
with zero variance keep ``reg_std = 1`` as in scanpy, so they rank last.

The streaming callers decide which cells to pass: all of them, or a random sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.interpolate import CubicHermiteSpline

LOESS_SPAN = 0.3
LOESS_MAX_POINTS = 1000  # exact local fits at this many x values, interpolated in between
_LOESS_BATCH = 32  # evaluation points per vectorised batch (bounds memory to 32 x n floats)


class GeneMoments:
    """Pass 1: per-gene sum and sum of squares over streamed CSR blocks (float64)."""

    def __init__(self, n_genes: int):
        self.n_cells = 0
        self.sums = np.zeros(n_genes)
        self.sumsq = np.zeros(n_genes)

    def add(self, X: sp.csr_matrix) -> None:
        n = len(self.sums)
        data = X.data.astype(np.float64)
        self.sums += np.bincount(X.indices, weights=data, minlength=n)
        self.sumsq += np.bincount(X.indices, weights=data * data, minlength=n)
        self.n_cells += X.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(self.n_cells, 1)

    @property
    def var(self) -> np.ndarray:
        """Unbiased variance (ddof=1), as scanpy's ``_get_mean_var``; never negative."""
        n = self.n_cells
        if n < 2:
            return np.zeros_like(self.sums)
        mean = self.mean
        return np.maximum((self.sumsq - n * mean * mean) / (n - 1), 0.0)


class ClippedMoments:
    """Pass 2: per-gene sum and sum of squares of ``min(x, clip[gene])``.

    Only stored entries can exceed the clip (zeros never do: clip > 0), so the sums run over
    ``data`` alone.
    """

    def __init__(self, clip: np.ndarray):
        self.clip = clip
        self.sums = np.zeros(len(clip))
        self.sumsq = np.zeros(len(clip))

    def add(self, X: sp.csr_matrix) -> None:
        n = len(self.clip)
        v = np.minimum(X.data.astype(np.float64), self.clip[X.indices])
        self.sums += np.bincount(X.indices, weights=v, minlength=n)
        self.sumsq += np.bincount(X.indices, weights=v * v, minlength=n)


def loess(
    x: np.ndarray,
    y: np.ndarray,
    span: float = LOESS_SPAN,
    max_points: int = LOESS_MAX_POINTS,
) -> np.ndarray:
    """Fitted values of a degree-2 local regression with tricube weights (loess, no robustness).

    Why local code: scanpy fits with ``skmisc.loess(span=0.3, degree=2)``; scikit-misc is not a
    dependency here. This is the same estimator: for each point, the ``floor(span * n)``
    nearest neighbours in x get tricube weights ``(1 - (d / h)^3)^3`` (h = distance to the
    farthest of them) and a weighted quadratic in (x - x0) is solved; its intercept is the fit.
    Like skmisc's default ``surface="interpolate"`` (exact fits at kd-tree vertices, then
    cubic Hermite interpolation with the local slopes), exact fits are computed at up to
    ``max_points`` quantiles of x and interpolated the same way, which keeps the cost
    O(max_points * n) for any gene count. Measured: equal to skmisc ``surface="direct"`` to
    1e-10 when every point is fitted; within 1e-3 of it in log10 variance otherwise.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 4:
        return np.full(n, y.mean() if n else 0.0)
    q = min(n, max(4, int(np.floor(n * span))))
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    grid = np.unique(np.quantile(xs, np.linspace(0.0, 1.0, min(max_points, n))))
    starts = _neighbour_windows(xs, grid, q)
    fits = [
        _local_quadratic(xs, ys, grid[i : i + _LOESS_BATCH], starts[i : i + _LOESS_BATCH], q)
        for i in range(0, len(grid), _LOESS_BATCH)
    ]
    value = np.concatenate([f[0] for f in fits])
    slope = np.concatenate([f[1] for f in fits])
    if len(grid) == 1:
        return np.full(n, value[0])
    return CubicHermiteSpline(grid, value, slope)(x)


def _neighbour_windows(xs: np.ndarray, at: np.ndarray, q: int) -> np.ndarray:
    """Start of the ``q`` nearest neighbours of each ``at`` in sorted ``xs`` (contiguous).

    Bisection on s: the window [s, s + q) should move right while the next point on the right
    is closer than the leftmost point of the window.
    """
    n = len(xs)
    pos = np.searchsorted(xs, at)
    lo = np.clip(pos - q, 0, n - q)
    hi = np.clip(pos, 0, n - q)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        move_right = xs[np.minimum(mid + q, n - 1)] - at < at - xs[mid]
        move_right &= mid + q < n
        lo = np.where(move_right & (lo < hi), mid + 1, lo)
        hi = np.where(~move_right & (lo < hi), mid, hi)
    return lo


def _local_quadratic(
    xs: np.ndarray, ys: np.ndarray, at: np.ndarray, starts: np.ndarray, q: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tricube-weighted quadratic fits at each of ``at`` over its window: (values, slopes)."""
    idx = starts[:, None] + np.arange(q)[None, :]
    dx = xs[idx] - at[:, None]
    y = ys[idx]
    dist = np.abs(dx)
    h = dist.max(axis=1)
    h = np.where(h > 0, h, 1.0) * (1 + 1e-10)  # the q-th neighbour itself gets a tiny weight
    term = np.clip(1.0 - (dist / h[:, None]) ** 3, 0.0, None) ** 3
    moments, rhs = [], []
    for k in range(5):
        moments.append(term.sum(axis=1))
        if k < 3:
            rhs.append((term * y).sum(axis=1))
        term = term * dx
    lhs = np.stack([np.stack([moments[i + j] for j in range(3)], axis=1) for i in range(3)], axis=1)
    beta = np.einsum("mij,mj->mi", np.linalg.pinv(lhs), np.stack(rhs, axis=1))
    return beta[:, 0], beta[:, 1]


@dataclass(frozen=True)
class VarianceModel:
    """Pass-1 results and the clip values pass 2 needs."""

    n_cells: int
    mean: np.ndarray
    var: np.ndarray
    reg_std: np.ndarray

    @property
    def clip(self) -> np.ndarray:
        return self.mean + np.sqrt(self.n_cells) * self.reg_std


def fit_variance_model(moments: GeneMoments, span: float = LOESS_SPAN) -> VarianceModel:
    """Regularised std per gene from the loess fit of log10 variance on log10 mean."""
    mean, var = moments.mean, moments.var
    fitted_log_var = np.zeros(len(mean))
    varying = var > 0
    if varying.sum() >= 1:
        fitted_log_var[varying] = loess(np.log10(mean[varying]), np.log10(var[varying]), span)
    reg_std = np.sqrt(10.0**fitted_log_var)
    return VarianceModel(n_cells=moments.n_cells, mean=mean, var=var, reg_std=reg_std)


def normalized_variance(model: VarianceModel, clipped: ClippedMoments) -> np.ndarray:
    """``sum over cells of (min(x, clip) - mean)^2 / ((n - 1) * reg_std^2)``, expanded."""
    n, mean = model.n_cells, model.mean
    total = n * mean * mean + clipped.sumsq - 2.0 * clipped.sums * mean
    return total / ((n - 1) * model.reg_std**2)


def rank_genes(norm_var: np.ndarray, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank per gene, 0 = most variable; boolean top-``n_top`` mask). Ties keep gene order."""
    order = np.argsort(-norm_var, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank, rank < n_top


def seurat_v3(
    blocks: Callable[[], Iterable[sp.csr_matrix]],
    n_genes: int,
    n_top: int,
    span: float = LOESS_SPAN,
) -> pd.DataFrame:
    """Two streaming passes; ``blocks()`` must yield the same cells each time it is called.

    Returns one row per gene: ``means``, ``variances``, ``variances_norm``,
    ``highly_variable_rank`` and ``highly_variable`` (scanpy's column names).
    """
    moments = GeneMoments(n_genes)
    for X in blocks():
        moments.add(X)
    if moments.n_cells < 2:
        raise ValueError("highly variable gene selection needs at least 2 cells")
    model = fit_variance_model(moments, span)
    clipped = ClippedMoments(model.clip)
    for X in blocks():
        clipped.add(X)
    norm_var = normalized_variance(model, clipped)
    rank, top = rank_genes(norm_var, n_top)
    return pd.DataFrame(
        {
            "means": model.mean,
            "variances": model.var,
            "variances_norm": norm_var,
            "highly_variable_rank": rank,
            "highly_variable": top,
        }
    )


def sample_rows(n_cells_per_input: list[int], n_sample: int, seed: int = 0) -> list[np.ndarray]:
    """A uniform random sample of ``n_sample`` cells over all inputs: sorted rows per input."""
    total = int(sum(n_cells_per_input))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(n_sample, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(n_cells_per_input)])
    return [
        chosen[(chosen >= lo) & (chosen < hi)] - lo
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def target_genes(labels: Iterable[str], exclude: Iterable[str | None]) -> list[str]:
    """Perturbation labels that name genes: every label except the control (and excluded)."""
    skip = {e for e in exclude if e is not None}
    return [lab for lab in dict.fromkeys(labels) if lab not in skip]
