"""Prediction back to counts: stochastic rounding that is unbiased in the log1p space the
models predict in (and cell-eval averages in), exact on values that are already counts."""

from __future__ import annotations

import numpy as np

from latentcell.models.expression import TARGET_SUM, log1p_normalize, to_counts


def test_to_counts_keeps_the_mean_log1p_expression():
    rng = np.random.default_rng(0)
    library = np.array([800.0, 3000.0, 20000.0])
    x = np.array([[0.0, 0.3, 1.1, 2.5, 4.0]] * 3, dtype=np.float32)
    draws = np.stack([to_counts(x, library, rng) for _ in range(4000)])
    assert np.array_equal(draws, np.round(draws)) and (draws >= 0).all()
    scale = TARGET_SUM / library[None, :, None]
    mean_log = np.log1p(draws * scale).mean(0)
    np.testing.assert_allclose(mean_log, x, atol=0.02)
    # the count-mean rounding this replaced is biased here: E[log1p] < log1p(E) (Jensen)
    expected = np.expm1(x) / scale[0]
    count_mean = np.floor(expected) + (rng.random((4000, *x.shape)) < expected - np.floor(expected))
    assert (np.log1p(count_mean * scale).mean(0)[:, 1:3] < x[:, 1:3] - 0.05).any()


def test_to_counts_returns_counts_unchanged():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, (50, 20)).astype(np.float32)
    library = counts.sum(1) + 100  # genes outside the model count toward the library too
    x = log1p_normalize(counts, library)
    np.testing.assert_array_equal(to_counts(x, library, rng), counts)
    assert (to_counts(-np.ones((2, 3), np.float32), np.ones(2) * 500, rng) == 0).all()
