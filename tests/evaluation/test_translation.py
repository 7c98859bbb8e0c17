"""Translation scores against independent implementations on data with a known answer:
per-column Pearson against scipy, undefined columns left out, the ridge baseline recovering
a linear map, the normalization by hand."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr

from latentcell.evaluation.translation import (
    column_pearson,
    log1p_normalized,
    ridge_translate,
    summary,
)


def test_column_pearson_is_scipys_and_undefined_for_constant_columns():
    rng = np.random.default_rng(0)
    pred, real = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    real[:, 1] = pred[:, 1] * 2 + 0.1 * real[:, 1]
    real[:, 3] = 0.0  # a gene never detected in the held-out cells
    r = column_pearson(pred, real)
    for j in range(3):
        assert np.isclose(r[j], pearsonr(pred[:, j], real[:, j]).statistic)
    assert np.isnan(r[3]) and r[1] > 0.99
    assert summary(r) == {"mean": np.mean(r[:3]), "median": np.median(r[:3]), "n": 3,
                          "n_undefined": 1}  # fmt: skip
    assert summary(r, np.array([True, False, False, True]))["n"] == 1


def test_log1p_normalized_by_hand():
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(log1p_normalized(counts), [[np.log1p(2500), np.log1p(7500)],
                                                          [0.0, 0.0]])  # fmt: skip


def test_ridge_recovers_a_linear_map_on_held_out_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20))
    y = x @ rng.normal(size=(20, 5)) + 0.05 * rng.normal(size=(300, 5))
    pred = ridge_translate(x[:200], y[:200], x[200:])
    assert column_pearson(pred, y[200:]).min() > 0.99
