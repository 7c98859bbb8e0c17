"""Observation likelihoods for count models: per-element log-probabilities and samplers.

Everything is computed in log space from ``lgamma``/``softplus`` so that the values stay finite
and accurate for zero counts, large counts, means near zero and inverse dispersions from tiny
(heavy overdispersion) to huge (the Poisson limit). All functions broadcast their arguments and
return per-element values; reducing over genes/cells is the caller's job, which keeps padding
masks and per-cell metrics in one place (the model).

Parametrizations:

* NB(mu, theta): mean ``mu``, inverse dispersion ``theta``, variance ``mu + mu**2 / theta``.
  Equal to ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``.
* ZINB(mu, theta, zi_logits): with ``pi = sigmoid(zi_logits)``,
  ``p(x) = pi * 1[x == 0] + (1 - pi) * NB(x; mu, theta)``.
* Gaussian(mean, log_var): for continuous (e.g. log1p-normalized) expression.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "csr_row_indices",
    "gaussian_log_prob",
    "nb_log_prob",
    "nb_log_prob_rows",
    "zinb_log_prob_rows",
    "sample_nb",
    "sample_zinb",
    "zinb_log_prob",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _tiny(t: torch.Tensor) -> float:
    # Smallest positive normal number of the dtype: clamping to it keeps log() finite (and the
    # gradient x / mu = 0 at x = 0) without changing any representable non-degenerate value.
    return torch.finfo(t.dtype).tiny


# Above this inverse dispersion, lgamma(x + theta) - lgamma(theta) is taken from Stirling's series
# instead of as a difference of two huge lgamma values (float32 loses every digit of it for
# theta ~ 1e6). At theta = 10 the truncated series is accurate to ~1e-10.
_STIRLING_MIN = 10.0


def _stirling_correction(y: torch.Tensor) -> torch.Tensor:
    # lgamma(y) - [(y - 1/2) log y - y + log(2 pi) / 2], first three terms of the series.
    r = 1.0 / y
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 / 1260.0))


def _lgamma_shift(
    a: torch.Tensor, s: torch.Tensor, lgamma_a: torch.Tensor | None = None
) -> torch.Tensor:
    """``lgamma(a + s) - lgamma(a)`` for ``s >= 0``, accurate also when ``a`` is huge.

    ``lgamma_a`` may be passed in when it is cheaper to compute elsewhere (per gene, then
    gathered). The Stirling branch is only evaluated when some ``a`` needs it.
    """
    direct = torch.lgamma(a + s) - (torch.lgamma(a) if lgamma_a is None else lgamma_a)
    big = a >= _STIRLING_MIN
    if not bool(big.any()):
        return direct
    # Evaluate the series on a clamped copy so the unused branch never produces inf/nan
    # (whose zero gradient would still turn into nan through torch.where).
    a_safe = torch.where(big, a, torch.full_like(a, _STIRLING_MIN))
    series = (
        s * torch.log(a_safe + s)
        + (a_safe - 0.5) * torch.log1p(s / a_safe)
        - s
        + _stirling_correction(a_safe + s)
        - _stirling_correction(a_safe)
    )
    return torch.where(big, series, direct)


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-element ``log NB(x; mu, theta)`` (mean / inverse-dispersion parametrization).

    Written as ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    - theta * softplus(log mu - log theta) - x * softplus(log theta - log mu)``; the softplus
    forms are the two ``log(1 + ratio)`` terms, which stay accurate when ``theta >> mu``
    (where ``theta * log(theta / (theta + mu))`` would cancel catastrophically) and when
    ``mu -> 0``. For large ``theta`` the lgamma difference comes from Stirling's series, so
    near-Poisson genes keep float32 accuracy.
    """
    x, mu, theta = torch.broadcast_tensors(x, mu, theta)
    mu = mu.clamp_min(_tiny(mu))
    theta = theta.clamp_min(_tiny(theta))
    log_mu = torch.log(mu)
    log_theta = torch.log(theta)
    return (
        _lgamma_shift(theta, x)
        - torch.lgamma(x + 1.0)
        - theta * F.softplus(log_mu - log_theta)
        - x * F.softplus(log_theta - log_mu)
    )


def csr_row_indices(x: torch.Tensor) -> torch.Tensor:
    """Row of every stored value of a sparse CSR matrix (the COO row index)."""
    crow = x.crow_indices()
    return torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), crow[1:] - crow[:-1])


def _nonzeros(
    x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, value) of the non-zero entries of a sparse CSR or dense ``(n, g)`` x."""
    if x.layout == torch.sparse_csr:
        cols, values, rows = x.col_indices(), x.values(), csr_row_indices(x)
        if bool((values == 0).any()):  # explicitly stored zeros
            keep = values != 0
            rows, cols, values = rows[keep], cols[keep], values[keep]
        return rows, cols, values.to(dtype)
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols].to(dtype)


def _take(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t[rows, cols]`` for a ``(n, g)`` tensor or a per-column ``(g,)`` / ``(1, g)`` one.

    ``index_select`` on a flat view: its backward is an ``index_add`` rather than the
    sort-based ``index_put`` of advanced indexing, which was a sixth of a training step.
    """
    if t.ndim == 1 or t.shape[0] == 1:
        return t.reshape(-1).index_select(0, cols)
    return t.reshape(-1).index_select(0, rows * n_cols + cols)


def _nb_zero_and_gathered(x, log_mu, log_theta):
    # log NB(0) for every element, and at the non-zeros: rows, columns and
    # log NB(x) - log NB(0) (the only terms that depend on x).
    if log_theta.ndim == 2 and log_theta.shape[0] > 1 and log_theta.stride(0) == 0:
        log_theta = log_theta[:1]  # a per-gene vector expanded over cells: stay (1, g)
    theta = torch.exp(log_theta)
    log_nb0 = -theta * F.softplus(log_mu - log_theta)
    rows, cols, values = _nonzeros(x, log_mu.dtype)
    n_cols = log_mu.shape[-1]
    lt = _take(log_theta, rows, cols, n_cols)
    lgamma_theta = None
    if log_theta.ndim == 1 or log_theta.shape[0] == 1:  # per gene: lgamma once per gene
        lgamma_theta = _take(torch.lgamma(theta), rows, cols, n_cols)
    excess = (
        _lgamma_shift(torch.exp(lt), values, lgamma_theta)
        - torch.lgamma(values + 1.0)
        - values * F.softplus(lt - _take(log_mu, rows, cols, n_cols))
    )
    return log_nb0, rows, cols, excess


def nb_log_prob_rows(
    x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor
) -> torch.Tensor:
    """Per-row ``sum_g log NB(x_g; exp(log_mu_g), exp(log_theta_g))``, ``(n,)``.

    The same value as ``nb_log_prob(...).sum(-1)``, computed the way count matrices make
    cheap: only ``log NB(0) = -theta * log(1 + mu / theta)`` is needed for every element; the
    lgamma terms (most of the cost) are evaluated at the non-zero counts only (~10% of a
    single-cell matrix). ``x`` may be a torch sparse CSR tensor (never densified) or dense;
    ``log_theta`` broadcasts against ``log_mu`` (e.g. one value per gene).
    """
    log_nb0, rows, _, excess = _nb_zero_and_gathered(x, log_mu, log_theta)
    return log_nb0.sum(-1).index_add(0, rows, excess)


def zinb_log_prob_rows(
    x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """Per-row ``sum_g log ZINB(...)``, ``(n,)``, sparse-aware like ``nb_log_prob_rows``:
    the zero case for every element, corrected to the non-zero case at the non-zeros."""
    log_nb0, rows, cols, excess = _nb_zero_and_gathered(x, log_mu, log_theta)
    log_nb0 = log_nb0.expand_as(zi_logits)
    log_pi = -F.softplus(-zi_logits)
    log_one_minus_pi = -F.softplus(zi_logits)
    zero_case = torch.logaddexp(log_pi, log_one_minus_pi + log_nb0)
    n_cols = zero_case.shape[-1]

    def at(t):
        return _take(t.contiguous(), rows, cols, n_cols)

    nonzero_case = at(log_one_minus_pi) + at(log_nb0) + excess
    return zero_case.sum(-1).index_add(0, rows, nonzero_case - at(zero_case))


def zinb_log_prob(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """Per-element ``log ZINB(x; mu, theta, pi = sigmoid(zi_logits))``.

    ``log pi = -softplus(-logits)`` and ``log(1 - pi) = -softplus(logits)`` avoid forming
    ``pi`` itself, and the zero case is a ``logaddexp`` of the two mixture components.
    """
    x, mu, theta, zi_logits = torch.broadcast_tensors(x, mu, theta, zi_logits)
    nb = nb_log_prob(x, mu, theta)
    log_pi = -F.softplus(-zi_logits)
    log_one_minus_pi = -F.softplus(zi_logits)
    zero_case = torch.logaddexp(log_pi, log_one_minus_pi + nb)
    nonzero_case = log_one_minus_pi + nb
    return torch.where(x == 0, zero_case, nonzero_case)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Per-element ``log N(x; mean, exp(log_var))``; the variance is never formed explicitly."""
    return -0.5 * (_LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def sample_nb(
    mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw NB(mu, theta) counts as a gamma-Poisson mixture (float tensor of integers).

    ``lambda ~ Gamma(shape=theta, rate=theta / mu)`` then ``x ~ Poisson(lambda)``; the gamma
    draw is ``standard_gamma(theta) * mu / theta`` so that a ``generator`` can be threaded
    through (``torch.distributions`` samplers do not take one).
    """
    mu, theta = torch.broadcast_tensors(mu, theta)
    mu = mu.clamp_min(0.0)
    theta = theta.clamp_min(_tiny(theta))
    gamma = torch._standard_gamma(theta.contiguous(), generator=generator)
    rate = gamma * (mu / theta)
    return torch.poisson(rate, generator=generator)


def sample_zinb(
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ZINB counts: NB counts zeroed where a ``Bernoulli(sigmoid(zi_logits))`` fires."""
    mu, theta, zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
    counts = sample_nb(mu, theta, generator=generator)
    dropout = torch.bernoulli(torch.sigmoid(zi_logits), generator=generator)
    return counts * (1.0 - dropout)
