"""Likelihoods against scipy references, and sampler moments against theory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from latentcell.models.likelihoods import (
    gaussian_log_prob,
    nb_log_prob,
    nb_log_prob_rows,
    sample_nb,
    sample_zinb,
    zinb_log_prob,
    zinb_log_prob_rows,
)

XS = np.array([0, 1, 2, 5, 17, 100, 1000, 100_000], dtype=np.float64)
MUS = np.array([1e-6, 1e-3, 0.5, 3.0, 50.0, 1e3, 1e5])
THETAS = np.array([1e-4, 1e-2, 1.0, 9.99, 10.0, 30.0, 1e3, 1e6])


def _grid():
    x, mu, theta = np.meshgrid(XS, MUS, THETAS, indexing="ij")
    return x.ravel(), mu.ravel(), theta.ravel()


def _t(a, dtype=torch.float64):
    return torch.tensor(a, dtype=dtype)


def _scipy_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_matches_scipy_float64():
    x, mu, theta = _grid()
    ref = _scipy_nb(x, mu, theta)
    ours = nb_log_prob(_t(x), _t(mu), _t(theta)).numpy()
    assert np.isfinite(ours).all()
    # scipy forms p = theta / (theta + mu) and log(1 - p), which itself loses ~1e-16 / (mu/theta)
    # relative accuracy; the grid keeps mu / theta >= 1e-12, so 1e-5 relative covers scipy.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def test_nb_float32_stays_accurate():
    x, mu, theta = _grid()
    keep = x <= 1000  # float32 lgamma(x + 1) alone is only ~1e-7 relative for huge x
    ref = _scipy_nb(x, mu, theta)[keep]
    ours = nb_log_prob(*(_t(a[keep], torch.float32) for a in (x, mu, theta))).numpy()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-3)


def test_nb_limits():
    x = torch.arange(0, 40, dtype=torch.float64)
    # Huge theta: Poisson.
    ours = nb_log_prob(x, _t(5.0), _t(1e12)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x.numpy(), 5.0), atol=1e-8)
    # mu -> 0: all mass at zero, exactly log p(0) = -theta * log1p(mu / theta) ~ -mu.
    assert nb_log_prob(_t(0.0), _t(1e-12), _t(2.0)).item() == pytest.approx(-1e-12, rel=1e-6)
    assert nb_log_prob(_t(0.0), _t(0.0), _t(2.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert nb_log_prob(_t(3.0), _t(0.0), _t(2.0)).item() < -500


def test_nb_gradients_finite_at_edges():
    mu = torch.tensor([0.0, 1e-30, 1e-3, 2.0, 1e4], requires_grad=True)
    theta = torch.tensor([1e-30, 1e-3, 5.0, 10.0, 1e7], requires_grad=True)
    x = torch.tensor([0.0, 0.0, 1.0, 3.0, 10_000.0])
    nb_log_prob(x, mu, theta).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(theta.grad).all()


def test_zinb_matches_hand_computed_reference():
    x, mu, theta = _grid()
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=x.shape)
    pi = 1.0 / (1.0 + np.exp(-logits))
    nb = np.exp(_scipy_nb(x, mu, theta))
    with np.errstate(divide="ignore"):
        ref = np.log(pi * (x == 0) + (1.0 - pi) * nb)
    ours = zinb_log_prob(_t(x), _t(mu), _t(theta), _t(logits)).numpy()
    finite = np.isfinite(ref)  # exp underflows to 0 for huge x; compare in log space below
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-5, atol=1e-8)
    log_ref = np.log1p(-pi[~finite]) + _scipy_nb(x, mu, theta)[~finite]
    np.testing.assert_allclose(ours[~finite], log_ref, rtol=1e-5)
    # Extreme logits stay finite.
    big = zinb_log_prob(_t([0.0, 4.0]), _t(2.0), _t(1.0), _t([60.0, -60.0]))
    assert torch.isfinite(big).all() and big[0].item() == pytest.approx(0.0, abs=1e-12)


def test_gaussian_matches_scipy():
    rng = np.random.default_rng(1)
    x, mean, log_var = rng.normal(size=(3, 50))
    ours = gaussian_log_prob(_t(x), _t(mean), _t(log_var)).numpy()
    ref = stats.norm.logpdf(x, mean, np.exp(0.5 * log_var))
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


@pytest.mark.parametrize(("mu", "theta"), [(0.3, 0.5), (5.0, 2.0), (40.0, 100.0)])
def test_sample_nb_moments(mu, theta):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    s = sample_nb(torch.full((n,), mu, dtype=torch.float64), _t(theta), generator=g)
    assert (s >= 0).all() and (s == s.round()).all()
    var = mu + mu**2 / theta
    # Standard error of the mean is sqrt(var / n); 5 of them is a loose, seed-stable bound.
    assert s.mean().item() == pytest.approx(mu, abs=5 * (var / n) ** 0.5)
    assert s.var().item() == pytest.approx(var, rel=0.05)
    # Same generator seed, same draws.
    g2 = torch.Generator().manual_seed(0)
    s2 = sample_nb(torch.full((n,), mu, dtype=torch.float64), _t(theta), generator=g2)
    assert torch.equal(s, s2)


def test_sample_zinb_moments():
    g = torch.Generator().manual_seed(1)
    n, mu, theta, logit = 200_000, 6.0, 3.0, 0.4
    pi = 1.0 / (1.0 + np.exp(-logit))
    s = sample_zinb(torch.full((n,), mu, dtype=torch.float64), _t(theta), _t(logit), generator=g)
    assert (s >= 0).all() and (s == s.round()).all()
    nb_var = mu + mu**2 / theta
    mean = (1 - pi) * mu
    var = (1 - pi) * (nb_var + mu**2) - mean**2
    p0 = pi + (1 - pi) * (theta / (theta + mu)) ** theta
    assert s.mean().item() == pytest.approx(mean, rel=0.02)
    assert s.var().item() == pytest.approx(var, rel=0.05)
    assert (s == 0).double().mean().item() == pytest.approx(p0, abs=0.01)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_row_sums_equal_elementwise_sums(layout):
    # The sparse-aware per-cell sums must equal summing the (scipy-checked) elementwise
    # log-probabilities, for every count pattern: zeros, small and large counts.
    gen = torch.Generator().manual_seed(0)
    n, g = 6, 40
    mu = torch.rand(n, g, generator=gen, dtype=torch.float64) * 20 + 0.01
    theta = torch.rand(g, generator=gen, dtype=torch.float64) * 50 + 0.05
    zi = torch.randn(n, g, generator=gen, dtype=torch.float64)
    x = sample_nb(mu, theta.expand(n, g), generator=gen)
    x[0] = 0.0  # an empty cell
    assert 0 < (x == 0).double().mean() < 1
    xs = x.to_sparse_csr() if layout == "csr" else x
    torch.testing.assert_close(
        nb_log_prob_rows(xs, mu.log(), theta.log()), nb_log_prob(x, mu, theta).sum(-1)
    )
    torch.testing.assert_close(
        zinb_log_prob_rows(xs, mu.log(), theta.log(), zi), zinb_log_prob(x, mu, theta, zi).sum(-1)
    )


def test_row_sums_gradients_match_elementwise():
    gen = torch.Generator().manual_seed(1)
    x = sample_nb(torch.full((5, 30), 2.0), torch.tensor(3.0), generator=gen).double()
    log_mu = torch.randn(5, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(30, generator=gen, dtype=torch.float64, requires_grad=True)
    nb_log_prob_rows(x.to_sparse_csr(), log_mu, log_theta).sum().backward()
    sparse_grads = (log_mu.grad.clone(), log_theta.grad.clone())
    log_mu.grad = log_theta.grad = None
    nb_log_prob(x, log_mu.exp(), log_theta.exp()).sum().backward()
    torch.testing.assert_close(sparse_grads[0], log_mu.grad)
    torch.testing.assert_close(sparse_grads[1], log_theta.grad)
