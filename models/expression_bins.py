"""Expression as discrete tokens: the bins of the masked-diffusion family, in plain numpy.

A cell's log1p-normalized expression (``expression.log1p_normalize``) becomes one bin per
gene: bin 0 is exactly zero (its own bin: most entries of a count matrix are zeros, and a
zero is not a small value), bins 1..K-1 split the NONZERO values at quantiles of the training
cells' nonzero values, pooled over genes. Pooled edges, not one set per gene: a gene seen a
few dozen times nonzero has no stable quantiles of its own, and one table lets a gene token's
bin mean the same level for every gene (the gene embedding says which gene it is).

``edges`` (K,) are kept with the run: bin k >= 1 spans [edges[k-1], edges[k]] (edges[0] is
the smallest nonzero training value, edges[-1] the largest). Quantile ties (the one-count
levels of small libraries) give repeated edges and so empty bins, which the model learns
never to emit. Going back, a nonzero bin is decoded by drawing a value uniformly inside it
(the sampler's "sampling within the bin"); ``expression.to_counts`` then draws counts at the
control's library size. No torch here: the ONNX runtime decodes with the same function.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bin_values", "fit_bin_edges", "values_from_bins"]


def fit_bin_edges(log1p: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins,) float32 edges from log1p expression (any shape): the nonzero values'
    quantiles at 0, 1/(K-1), ..., 1 (K = n_bins). Raises ValueError with no nonzero value."""
    if n_bins < 3:
        raise ValueError(f"n_bins must be >= 3 (zero + two levels), got {n_bins}")
    values = np.asarray(log1p, dtype=np.float64).ravel()
    values = values[values > 0]
    if values.size == 0:
        raise ValueError("no nonzero expression to fit bins on")
    levels = np.linspace(0.0, 1.0, n_bins)
    return np.quantile(values, levels).astype(np.float32)


def bin_values(log1p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """int64 bins (same shape): 0 for zero, else 1 + how many inner edges lie at or below
    the value (values beyond the fitted range fall in the first or last bin)."""
    x = np.asarray(log1p, dtype=np.float32)
    inner = np.asarray(edges, dtype=np.float32)[1:-1]
    bins = 1 + np.searchsorted(inner, x, side="right")
    return np.where(x > 0, bins, 0).astype(np.int64)


def values_from_bins(bins: np.ndarray, edges: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 log1p values: 0 for bin 0, a uniform draw inside bin k's [edges[k-1], edges[k]]
    otherwise."""
    bins = np.asarray(bins, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.float32)
    low = edges[np.clip(bins - 1, 0, len(edges) - 1)]
    high = edges[np.clip(bins, 0, len(edges) - 1)]
    value = low + (high - low) * rng.random(bins.shape, dtype=np.float32)
    return np.where(bins > 0, value, 0.0).astype(np.float32)
