"""Every generation metric on cases whose answer is known (by hand or in closed form)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm, wasserstein_distance

from latentcell.evaluation import metrics as m


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    x[:, 0] += shift
    return x


# --- MMD ------------------------------------------------------------------------------------


def test_mmd_hand_computed_two_points():
    """x = y = {0, 1}, one kernel with sigma^2 = 1: Kxx' = Kyy' = e^-1/2, mean Kxy = (1+e^-1/2)/2.

    Unbiased: e^-1/2 + e^-1/2 - (1 + e^-1/2) = e^-1/2 - 1 (negative: the U-statistic drops the
    diagonal of the within-set matrices only).
    """
    x = np.array([[0.0], [1.0]])
    assert m.mmd_rbf(x, x, bandwidths=(1.0,)) == pytest.approx(math.exp(-0.5) - 1.0)


def test_mmd_same_distribution_near_zero_and_grows_with_shift():
    x = _gauss(300, 5, 0)
    values = [m.mmd_rbf(x, _gauss(300, 5, 1, shift=s), bandwidths=(1, 5, 20)) for s in (0, 1, 3)]
    assert abs(values[0]) < 0.01
    assert values[0] < values[1] < values[2]


def test_mmd_is_the_mean_over_bandwidths():
    x, y = _gauss(40, 3, 0), _gauss(50, 3, 1, shift=1.0)
    single = [m.mmd_rbf(x, y, bandwidths=(s,)) for s in (1.0, 5.0)]
    assert m.mmd_rbf(x, y, bandwidths=(1.0, 5.0)) == pytest.approx(np.mean(single))


# --- energy distance ------------------------------------------------------------------------


def test_energy_distance_hand_computed_three_points():
    """x = {0, 2}, y = {1}: E|X-Y| = 1, E|X-X'| = (0+2+2+0)/4 = 1, E|Y-Y'| = 0 -> 2 - 1 - 0."""
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0]])
    assert m.energy_distance(x, y) == pytest.approx(1.0)
    assert m.energy_distance(y, x) == pytest.approx(1.0)


def test_energy_distance_identical_is_zero():
    x = _gauss(50, 3, 0)
    assert m.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_distance_matches_gaussian_closed_form():
    """N(0,1) vs N(d,1): X-Y ~ N(-d, 2), E|N(mu, s^2)| = s sqrt(2/pi) e^(-mu^2/2s^2) + mu(1-2Phi(-mu/s))."""
    delta, s = 1.0, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * s * s)) + delta * (
        1 - 2 * norm.cdf(-delta / s)
    )
    expected = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    x, y = _gauss(2000, 1, 0), _gauss(2000, 1, 1, shift=delta)
    assert m.energy_distance(x, y) == pytest.approx(expected, abs=0.03)


def test_energy_distance_strictly_monotone_in_shift():
    x = _gauss(200, 4, 0)
    values = [m.energy_distance(x, _gauss(200, 4, 1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


# --- Wasserstein ----------------------------------------------------------------------------


def test_wasserstein_identical_and_permuted_is_zero():
    x = _gauss(100, 3, 0)
    perm = np.random.default_rng(1).permutation(100)
    assert m.wasserstein(x, x[perm]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_of_a_translated_sample_is_the_shift(p):
    """y = x + delta: the identity matching is optimal, so W_p = |delta| exactly."""
    x = _gauss(200, 3, 0)
    delta = np.array([3.0, -4.0, 0.0])
    assert m.wasserstein(x, x + delta, p=p) == pytest.approx(5.0, rel=1e-9)


def test_wasserstein_two_gaussians_large_n():
    x, y = _gauss(800, 2, 0), _gauss(800, 2, 1, shift=3.0)
    assert m.wasserstein(x, y) == pytest.approx(3.0, abs=0.25)


def test_wasserstein_sinkhorn_branch_agrees_with_exact():
    x, y = _gauss(150, 3, 0), _gauss(150, 3, 1, shift=1.0)
    exact = m.wasserstein(x, y, exact_max=5000)
    sinkhorn = m.wasserstein(x, y, exact_max=0)
    assert sinkhorn == pytest.approx(exact, rel=0.01)


def test_wasserstein_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="equal sample sizes"):
        m.wasserstein(np.zeros((3, 2)), np.zeros((4, 2)))


# --- kNN AUC --------------------------------------------------------------------------------


def test_knn_auc_half_for_same_distribution_one_for_separated():
    real = _gauss(400, 5, 0)
    assert m.knn_auc(real, _gauss(400, 5, 1)) == pytest.approx(0.5, abs=0.08)
    assert m.knn_auc(real, _gauss(400, 5, 2, shift=20.0)) == pytest.approx(1.0)


def test_knn_auc_is_seeded():
    real, gen = _gauss(100, 3, 0), _gauss(100, 3, 1, shift=0.5)
    assert m.knn_auc(real, gen, seed=3) == m.knn_auc(real, gen, seed=3)


# --- PRDC -----------------------------------------------------------------------------------


def test_prdc_identical_sets():
    """Each real ball holds itself and its k-1 strictly nearer neighbours: density = k n / (k n)."""
    x = _gauss(200, 4, 0)
    out = m.prdc(x, x, k=5)
    assert out == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def test_prdc_same_distribution_high_and_far_set_zero():
    real = _gauss(300, 3, 0)
    near = m.prdc(real, _gauss(300, 3, 1))
    assert min(near["precision"], near["recall"], near["coverage"]) > 0.8
    assert near["density"] == pytest.approx(1.0, abs=0.25)
    far = m.prdc(real, _gauss(300, 3, 2, shift=100.0))
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_mode_collapse_keeps_precision_loses_recall():
    real = _gauss(300, 2, 0)
    collapsed = _gauss(300, 2, 1) * 0.05  # all generated cells near the real centre
    out = m.prdc(real, collapsed)
    assert out["precision"] > 0.9
    assert out["recall"] < 0.2


# --- gene-level agreement -------------------------------------------------------------------


def test_gene_mean_var_agreement_identical_is_perfect():
    x = np.random.default_rng(0).gamma(2.0, size=(100, 20))
    out = m.gene_mean_var_agreement(x, x)
    assert out == pytest.approx({"mean_pearson": 1, "mean_r2": 1, "var_pearson": 1, "var_r2": 1})


def test_gene_mean_var_agreement_hand_computed():
    """Means real [1,2,3], generated [1,2,4]: R^2 = 1 - 1/2; variances all 1 -> undefined."""
    real = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]])
    gen = np.array([[0.0, 1.0, 3.0], [2.0, 3.0, 5.0]])
    out = m.gene_mean_var_agreement(real, gen)
    assert out["mean_r2"] == pytest.approx(0.5)
    assert out["mean_pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 4])[0, 1])
    assert math.isnan(out["var_pearson"]) and math.isnan(out["var_r2"])


def test_zero_fraction_agreement_hand_computed():
    """Zero fractions per gene: real [1/2, 0, 1], generated [1/2, 1/2, 1/2]."""
    real = np.array([[0, 1, 0], [3, 2, 0]])
    gen = np.array([[0, 0, 1], [1, 5, 0]])
    out = m.zero_fraction_agreement(real, gen)
    assert out["zero_frac_mae"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert math.isnan(out["zero_frac_pearson"])  # generated fractions are constant
    assert out["sparsity_real"] == pytest.approx(3 / 6)
    assert out["sparsity_generated"] == pytest.approx(3 / 6)
    same = m.zero_fraction_agreement(real, real)
    assert same["zero_frac_mae"] == 0.0 and same["zero_frac_pearson"] == pytest.approx(1.0)


def test_per_gene_wasserstein_matches_scipy_and_known_shift():
    rng = np.random.default_rng(0)
    real, gen, gen_short = (
        rng.normal(size=(60, 7)),
        rng.normal(size=(60, 7)),
        rng.normal(size=(45, 7)),
    )
    for other in (gen, gen_short):
        expected = np.mean([wasserstein_distance(real[:, j], other[:, j]) for j in range(7)])
        assert m.per_gene_wasserstein(real, other) == pytest.approx(expected)
    assert m.per_gene_wasserstein(real, real + 0.75) == pytest.approx(0.75)


# --- condition structure --------------------------------------------------------------------


def test_silhouette_two_far_clusters_near_one_and_single_label_nan():
    x = np.concatenate([_gauss(50, 2, 0), _gauss(50, 2, 1, shift=100.0)])
    labels = np.array(["a"] * 50 + ["b"] * 50)
    assert m.silhouette_by_condition(x, labels) > 0.95
    assert m.silhouette_by_condition(x, labels, sample_size=40, seed=0) > 0.95
    assert math.isnan(m.silhouette_by_condition(x, np.array(["a"] * 100)))


def test_classifier_accuracy_separable_and_swapped_labels():
    train = np.concatenate([_gauss(60, 3, 0), _gauss(60, 3, 1, shift=10.0)])
    labels = np.array(["a"] * 60 + ["b"] * 60)
    test = np.concatenate([_gauss(30, 3, 2), _gauss(30, 3, 3, shift=10.0)])
    test_labels = np.array(["a"] * 30 + ["b"] * 30)
    assert m.classifier_accuracy(train, labels, test, test_labels) == 1.0
    assert m.classifier_accuracy(train, labels, test, test_labels[::-1]) == 0.0
    model = m.fit_condition_classifier(train, labels)
    assert m.accuracy(model, test, test_labels) == 1.0


def test_distance_to_training_ratio_flags_copies_of_training_cells():
    """Same distribution as training: about 1; noisy copies of training cells: well below
    1; cells far from the training data: above 1. Hand-computed on a 1-D case."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(800, 5))
    fresh = rng.normal(size=(300, 5))
    assert 0.85 < m.distance_to_training_ratio(train, fresh, rng.normal(size=(300, 5))) < 1.15
    copies = train[:300] + rng.normal(scale=0.01, size=(300, 5))
    assert m.distance_to_training_ratio(train, fresh, copies) < 0.05
    assert m.distance_to_training_ratio(train, fresh, fresh + 3.0) > 2.0
    one_d = np.array([[0.0], [10.0]])
    # reference distances 1, 2, 3 (median 2); generated distances 0.5 and 1.5 (median 1)
    ref, gen = np.array([[1.0], [8.0], [3.0]]), np.array([[0.5], [8.5]])
    assert m.distance_to_training_ratio(one_d, ref, gen) == pytest.approx(0.5)


def test_latent_nn_ratio_is_one_for_fresh_draws_and_near_zero_for_copies():
    """A fresh sample of the training distribution: about 1 (its nearest training latent is
    as far as a training latent's nearest other one); jittered copies of training latents:
    far below 1; exact copies: 0. Hand-computed on a 1-D case."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(1000, 8))
    assert 0.9 < m.latent_nn_ratio(train, rng.normal(size=(500, 8))) < 1.1
    copies = train[rng.integers(0, 1000, 500)]
    assert m.latent_nn_ratio(train, copies) == 0.0
    assert m.latent_nn_ratio(train, copies + rng.normal(scale=0.1, size=copies.shape)) < 0.2
    assert m.latent_nn_ratio(train, rng.normal(size=(500, 8)) * 2.0) > 1.5  # too spread out
    # training gaps 1, 2 -> leave-one-out distances 1, 1, 2 (median 1); generated 0.25, 0.5
    one_d = np.array([[0.0], [1.0], [3.0]])
    assert m.latent_nn_ratio(one_d, np.array([[0.25], [2.5], [3.5]])) == pytest.approx(0.5)
