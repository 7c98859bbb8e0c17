"""Seurat v3 HVGs: streamed moments vs dense numpy, the loess fit, over-dispersed genes win."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.hvg import (
    ClippedMoments,
    GeneMoments,
    fit_variance_model,
    loess,
    normalized_variance,
    rank_genes,
    sample_rows,
    seurat_v3,
    target_genes,
)


def _blocks(X: sp.csr_matrix, size: int):
    return [X[i : i + size] for i in range(0, X.shape[0], size)]


def _tiny() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    dense = rng.poisson(rng.uniform(0.2, 5, size=30), size=(200, 30)).astype(np.float32)
    dense[:, 3] = 0  # a constant gene
    dense[5, 6] = 80  # an outlier that the clip must cap
    return sp.csr_matrix(dense)


def test_moments_match_dense_numpy():
    X = _tiny()
    moments = GeneMoments(30)
    for B in _blocks(X, 7):
        moments.add(B)
    dense = X.toarray().astype(np.float64)
    assert moments.n_cells == 200
    np.testing.assert_allclose(moments.mean, dense.mean(axis=0))
    np.testing.assert_allclose(moments.var, dense.var(axis=0, ddof=1), atol=1e-12)


def test_normalized_variance_matches_dense_formula():
    X = _tiny()
    moments = GeneMoments(30)
    moments.add(X)
    model = fit_variance_model(moments)
    assert model.reg_std[3] == 1.0  # zero-variance genes keep reg_std 1, as in scanpy
    clipped = ClippedMoments(model.clip)
    for B in _blocks(X, 9):
        clipped.add(B)
    dense = X.toarray().astype(np.float64)
    n = dense.shape[0]
    capped = np.minimum(dense, model.mean + np.sqrt(n) * model.reg_std)
    assert capped[5, 6] < 80
    expected = ((capped - model.mean) ** 2).sum(axis=0) / ((n - 1) * model.reg_std**2)
    np.testing.assert_allclose(normalized_variance(model, clipped), expected, rtol=1e-10)


def _reference_loess(x, y, span):
    """Plain per-point loess (degree 2, tricube), O(n^2): the definition the fast one follows."""
    q = int(np.floor(len(x) * span))
    out = np.empty(len(x))
    for i, x0 in enumerate(x):
        d = np.abs(x - x0)
        h = np.sort(d)[q - 1] * (1 + 1e-10)
        w = np.clip(1 - (d / h) ** 3, 0, None) ** 3
        A = np.stack([np.ones_like(x), x - x0, (x - x0) ** 2], axis=1)
        beta = np.linalg.lstsq(A * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
        out[i] = beta[0]
    return out


def test_loess_matches_definition_and_interpolates_closely():
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(-2, 1, 300))
    y = 0.3 + 1.6 * x + 0.1 * x**2 + rng.normal(0, 0.2, 300)
    reference = _reference_loess(x, y, 0.3)
    np.testing.assert_allclose(loess(x, y, 0.3, max_points=10**6), reference, atol=1e-8)
    np.testing.assert_allclose(loess(x, y, 0.3, max_points=60), reference, atol=0.02)
    shuffled = rng.permutation(300)
    np.testing.assert_allclose(
        loess(x[shuffled], y[shuffled], 0.3, max_points=10**6), reference[shuffled], atol=1e-8
    )


def test_loess_reproduces_a_quadratic():
    x = np.linspace(0, 3, 200)
    y = 1 - x + 0.5 * x**2
    np.testing.assert_allclose(loess(x, y), y, atol=1e-6)


def _overdispersed(n_cells=600, n_genes=400, n_hot=8, seed=0):
    """Poisson genes plus ``n_hot`` genes on (3x) in a random third of the cells, off elsewhere.

    The switch keeps each hot gene's mean, so it sits inside the bulk of the mean range and
    only its variance (mu + 2 mu^2 instead of mu) sets it apart.
    """
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.uniform(-1.0, 2.0, n_genes))
    rates = np.tile(mu, (n_cells, 1))
    hot = rng.choice(n_genes, n_hot, replace=False)
    on = rng.random((n_cells, n_hot)) < 0.33
    rates[:, hot] *= np.where(on, 3.0, 0.0)
    return sp.csr_matrix(rng.poisson(rates).astype(np.float32)), hot


def test_seurat_v3_selects_overdispersed_genes():
    X, hot = _overdispersed()
    calls = []

    def blocks():
        calls.append(1)
        return _blocks(X, 128)

    table = seurat_v3(blocks, X.shape[1], n_top=len(hot))
    assert len(calls) == 2  # exactly two passes
    assert set(np.flatnonzero(table["highly_variable"])) == set(hot)
    assert table["highly_variable"].sum() == len(hot)
    assert set(table["highly_variable_rank"][hot]) == set(range(len(hot)))
    assert list(table.columns) == [
        "means",
        "variances",
        "variances_norm",
        "highly_variable_rank",
        "highly_variable",
    ]


def test_seurat_v3_on_a_cell_sample_still_finds_them():
    X, hot = _overdispersed(n_cells=2000, seed=3)
    rows = sample_rows([X.shape[0]], 500, seed=0)[0]
    table = seurat_v3(lambda: _blocks(X[rows], 100), X.shape[1], n_top=len(hot))
    assert set(np.flatnonzero(table["highly_variable"])) == set(hot)


def test_rank_genes_is_stable_on_ties():
    rank, top = rank_genes(np.array([1.0, 3.0, 3.0, 0.5]), 2)
    assert list(rank) == [2, 0, 1, 3] and list(top) == [False, True, True, False]


def test_sample_rows_spans_inputs():
    rows = sample_rows([10, 0, 5], 8, seed=1)
    assert sum(len(r) for r in rows) == 8 and len(rows[1]) == 0
    assert all((np.diff(r) > 0).all() for r in rows)
    assert rows[0].max() < 10 and rows[2].max() < 5
    assert [list(r) for r in sample_rows([10, 0, 5], 8, seed=1)] == [list(r) for r in rows]
    assert sum(len(r) for r in sample_rows([3, 4], 100)) == 7


def test_target_genes_drop_controls():
    assert target_genes(
        ["non-targeting", "A", "B", "A", "unspecified"], ["non-targeting", None, "unspecified"]
    ) == ["A", "B"]


def test_needs_two_cells():
    with pytest.raises(ValueError, match="at least 2 cells"):
        seurat_v3(lambda: [sp.csr_matrix(np.ones((1, 3)))], 3, 2)
