"""Tiny synthetic count data for the evaluation tests: NB counts with per-condition means."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

N_GENES = 300
CONDITIONS = ("ctrl", "pertA", "pertB")


def condition_means(n_genes: int = N_GENES) -> dict[str, np.ndarray]:
    """Fixed NB means per condition: a shared base times a strong per-condition effect."""
    rng = np.random.default_rng(123)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    return {c: base * rng.lognormal(0.0, 1.0, size=n_genes) for c in (*CONDITIONS, "rare")}


def nb_cells(
    sizes: dict[str, int],
    seed: int,
    relabel: dict[str, str] | None = None,
    n_genes: int = N_GENES,
) -> ad.AnnData:
    """NB(5) counts drawn from each condition's means; ``relabel`` renames conditions after."""
    rng = np.random.default_rng(seed)
    means = condition_means(n_genes)
    blocks, labels = [], []
    for cond, n in sizes.items():
        mu = means[cond]
        blocks.append(rng.negative_binomial(5, 5.0 / (5.0 + mu), size=(n, n_genes)))
        labels += [(relabel or {}).get(cond, cond)] * n
    obs = pd.DataFrame({"condition": labels}, index=[f"cell{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    return adata
