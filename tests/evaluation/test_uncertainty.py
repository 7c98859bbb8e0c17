"""``evaluation/uncertainty.py`` on populations whose answer is known: members drawn from
the real cells' distribution are calibrated, collapsed ones are not, too-wide ones
over-cover; the variance R² recomputed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from latentcell.evaluation.uncertainty import (
    calibrated_coverage,
    interval_width,
    mean_coverage,
    score_group,
    variance_r2,
)

M, N, G = 40, 200, 500


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(7)
    mean = rng.uniform(0.5, 3.0, G)
    sd = rng.uniform(0.2, 1.5, G)
    real = rng.normal(mean, sd, (N, G))
    return rng, mean, sd, real


def test_members_from_the_true_distribution_are_calibrated(truth):
    rng, mean, sd, real = truth
    members = rng.normal(mean, sd, (M, N, G))
    assert mean_coverage(members, real, 0.9) == pytest.approx(0.9, abs=0.05)
    assert variance_r2(members[0], real) > 0.9
    # the interval is the sampling noise of a mean of N cells: 2 z sd / sqrt(N)
    expected = np.mean(2 * 1.645 * sd / np.sqrt(N))
    assert interval_width(members, 0.9) == pytest.approx(expected, rel=0.2)


def test_poisson_members_are_calibrated_as_a_list():
    rng = np.random.default_rng(3)
    rate = np.exp(rng.uniform(np.log(0.02), np.log(20.0), G))  # sparse to well expressed
    real = np.log1p(rng.poisson(rate, (N, G)))
    members = [np.log1p(rng.poisson(rate, (N, G))) for _ in range(M)]
    scores = score_group(members, real, 0.9)
    assert scores["coverage_90"] == pytest.approx(0.9, abs=0.05)
    assert scores["variance_r2"] > 0.9


def test_collapsed_members_cover_little_and_lose_the_variance(truth):
    rng, mean, sd, real = truth
    at_mean = np.broadcast_to(mean, (M, N, G))  # every cell at the true mean: no spread
    assert mean_coverage(at_mean, real, 0.9) < 0.2
    assert variance_r2(at_mean[0] + rng.normal(0, 1e-3, (N, G)), real) < 0.0
    repeated = [real[:N] for _ in range(M)]  # the same cells in every member
    assert mean_coverage(repeated, rng.normal(mean, sd, (N, G)), 0.9) < 0.2
    # by hand: v_pred = 0 gives 1 - sum(v²) / sum((v - v̄)²)
    v = real.var(axis=0, ddof=1)
    expected = 1 - np.sum(v**2) / np.sum((v - v.mean()) ** 2)
    assert variance_r2(np.broadcast_to(mean, (N, G)), real) == pytest.approx(expected)


def test_too_wide_members_over_cover(truth):
    rng, mean, sd, real = truth
    wide = rng.normal(mean, 3 * sd, (M, N, G))
    assert mean_coverage(wide, real, 0.9) > 0.97
    calibrated = rng.normal(mean, sd, (M, N, G))
    assert interval_width(wide) == pytest.approx(3 * interval_width(calibrated), rel=0.2)
    assert variance_r2(wide[0], real) < 0.0  # nine times the variance


def test_calibrated_coverage_with_few_members():
    assert calibrated_coverage(20) == pytest.approx(0.9)
    assert calibrated_coverage(40) == pytest.approx(0.9)
    assert calibrated_coverage(5) == pytest.approx(4 / 6)  # the interval spans min..max
    rng = np.random.default_rng(11)
    real = rng.normal(0, 1, (50, 4000))
    members = rng.normal(0, 1, (5, 50, 4000))
    assert mean_coverage(members, real) == pytest.approx(4 / 6, abs=0.03)


def test_edge_cases():
    rng = np.random.default_rng(0)
    constant_variance = np.tile([[0.0], [2.0]], (5, 30))  # every gene: variance the same
    assert np.isnan(variance_r2(rng.normal(size=(10, 30)), constant_variance))
    assert np.isnan(variance_r2(rng.normal(size=(10, 30)), np.ones((10, 30))))
    with pytest.raises(ValueError, match="genes"):
        variance_r2(np.zeros((10, 30)), np.zeros((10, 31)))
    with pytest.raises(ValueError, match="genes"):
        mean_coverage(np.zeros((3, 10, 30)), np.zeros((10, 31)))
    with pytest.raises(ValueError, match="gene counts"):
        mean_coverage([np.zeros((10, 30)), np.zeros((10, 31))], np.zeros((10, 30)))
    with pytest.raises(ValueError, match=">= 2 members"):
        mean_coverage([np.zeros((10, 30))], np.zeros((10, 30)))
    with pytest.raises(ValueError, match="level"):
        mean_coverage(np.zeros((3, 10, 30)), np.zeros((10, 30)), level=1.0)
