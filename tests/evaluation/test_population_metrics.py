"""The held-out benchmark's population metrics on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from latentcell.evaluation.population_metrics import energy_in_pca, shift_metrics, top_genes


@pytest.fixture
def cells():
    rng = np.random.default_rng(0)
    control = rng.normal(1.0, 0.3, (400, 30))
    shift = np.zeros(30)
    shift[:5] = [2.0, -1.5, 1.0, 0.8, -0.6]
    real = rng.normal(1.0, 0.3, (400, 30)) + shift
    return control, real, shift


def test_a_perfect_prediction_scores_one(cells):
    control, real, _ = cells
    out = shift_metrics(real, real, control, k=5)
    assert out == pytest.approx(
        {"pearson_delta": 1.0, "pearson_delta_top": 1.0, "r2_means_top": 1.0}
    )


def test_a_scaled_shift_keeps_pearson_but_loses_r2(cells):
    control, real, shift = cells
    half = control + shift / 2  # the right direction, half the size
    out = shift_metrics(half, real, control, k=5)
    assert out["pearson_delta_top"] > 0.99
    # R^2 by hand on the top genes: real means vs means with half the shift
    top = top_genes(real, control, 5)
    target, pred = real.mean(0)[top], half.mean(0)[top]
    expected = 1 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert out["r2_means_top"] == pytest.approx(expected)
    assert out["r2_means_top"] < 0.9


def test_no_response_and_the_wrong_response(cells):
    control, real, shift = cells
    assert set(top_genes(real, control, 5)) == set(range(5))
    opposite = shift_metrics(control - shift, real, control, k=5)
    assert opposite["pearson_delta_top"] < -0.99 and opposite["r2_means_top"] < 0
    constant = shift_metrics(np.tile(control.mean(0), (10, 1)), real, control, k=5)
    assert np.isnan(constant["pearson_delta"])  # no shift: no direction to agree with


def test_energy_in_pca_is_zero_for_identical_cells_and_grows_with_the_gap(cells):
    control, real, shift = cells
    fit = np.concatenate([control, real])
    assert energy_in_pca(real, real, fit) == pytest.approx(0.0, abs=1e-9)
    near, far = control + shift * 0.9, control
    assert energy_in_pca(near, real, fit) < energy_in_pca(far, real, fit)
