"""Counts from the VAE decoder's parameters, in numpy: what ``CountVAE.sample`` does in torch.

NB: a gamma-Poisson mixture (lambda ~ Gamma(theta, scale mu / theta), x ~ Poisson(lambda));
ZINB: NB counts zeroed with probability sigmoid(zi_logits); Gaussian: log1p-normalized
expression drawn around the mean, mapped back to counts at the library size. The draws come
from numpy's generator, so they match torch's in distribution, not cell for cell.
"""

from __future__ import annotations

import numpy as np

from latentcell.models.expression import TARGET_SUM

__all__ = ["mean_log1p", "sample_counts"]

_TINY = np.finfo(np.float32).tiny


def sample_counts(
    params: dict[str, np.ndarray], library: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Counts (n, G) float32 for decoder outputs ``params`` at ``library`` (n,)."""
    if "mean" in params:  # Gaussian on log1p-normalized expression
        x = params["mean"] + np.exp(0.5 * params["log_var"]) * rng.standard_normal(
            params["mean"].shape
        )
        counts = np.round(np.clip(np.expm1(x), 0, None) * library[:, None] / TARGET_SUM)
        return counts.astype(np.float32)
    mu = np.clip(params["mu"].astype(np.float64), 0, None)
    theta = np.clip(params["theta"].astype(np.float64), _TINY, None)
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    if "zi_logits" in params:
        dropout = rng.random(counts.shape) < 1.0 / (1.0 + np.exp(-params["zi_logits"]))
        counts[dropout] = 0.0
    return counts


def mean_log1p(params: dict[str, np.ndarray], library: np.ndarray) -> np.ndarray:
    """The decoder's mean expression on the log1p scale (n, G), for decoders run at
    ``library`` = 1e4 (what the torch ``VAEBridge.decode`` returns)."""
    if "mean" in params:
        return params["mean"].astype(np.float32)
    scale = params["mu"] / library[:, None]
    return np.log1p(scale * TARGET_SUM).astype(np.float32)
