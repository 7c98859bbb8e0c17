"""Synthetic CITE-seq cells with a known answer, shared by the multiomics tests: a low-rank
latent z drives both modalities, so each modality's expected normalized expression is a
known function of z, and translation can be checked against it.

RNA counts are NB (inverse dispersion 10) around softmax(z W + b) times a log-normal library;
protein counts the same with their own loadings and libraries. ``truth`` holds the noise-free
normalized expression, log1p(proportion * 1e4), of both modalities.
"""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _nb(rng, mean: np.ndarray, theta: float = 10.0) -> np.ndarray:
    return rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)


def synthetic_cite(n_cells=600, n_genes=80, n_proteins=12, n_latent=3, seed=0) -> SimpleNamespace:
    """(``adata``: counts in X, a named DataFrame in obsm['protein_counts']; ``truth``: the
    noise-free normalized expression per modality; ``z``: the latent)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_cells, n_latent))
    rna_p = _softmax(z @ rng.normal(0, 1.0, (n_latent, n_genes)) + rng.normal(0, 1, n_genes))
    prot_p = _softmax(
        z @ rng.normal(0, 1.0, (n_latent, n_proteins)) + rng.normal(0, 0.5, n_proteins)
    )
    rna_lib = rng.lognormal(np.log(3000), 0.3, n_cells)[:, None]
    prot_lib = rng.lognormal(np.log(1500), 0.3, n_cells)[:, None]
    cells = pd.Index([f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(
        X=sp.csr_matrix(_nb(rng, rna_p * rna_lib)),
        obs=pd.DataFrame(index=cells),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    adata.obsm["protein_counts"] = pd.DataFrame(
        _nb(rng, prot_p * prot_lib), index=cells, columns=[f"CD{i}" for i in range(n_proteins)]
    )
    adata.uns["source"] = "synthetic (tests/multiomics_data.py)"
    truth = {"rna": np.log1p(rna_p * 1e4), "protein": np.log1p(prot_p * 1e4)}
    return SimpleNamespace(adata=adata, truth=truth, z=z)


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``a`` with the same column of ``b`` (across rows)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))


def trained_multiomics(root, *overrides: str, n_cells: int = 600, steps: int = 300):
    """``synthetic_cite`` split 500 / rest into ``root/train.h5ad`` and ``root/test.h5ad``,
    and a multiomics run on the training file (``latentcell train multiomics``, quiet and
    untracked; 300 steps of 128 cells on 80 genes: a few seconds on one CPU thread)."""
    from tests.cvae_runs import train_family

    data = synthetic_cite(n_cells=n_cells)
    data.adata[:500].copy().write_h5ad(root / "train.h5ad")
    data.adata[500:].copy().write_h5ad(root / "test.h5ad")
    run = root / "multiomics"
    code = train_family("multiomics", f"data.path={root / 'train.h5ad'}", f"run.dir={run}",
                        "data.n_top_genes=0", "model.n_hidden=64", "model.kl_warmup_steps=100",
                        "optim.lr=3e-3", f"train.max_steps={steps}", *overrides)  # fmt: skip
    assert code == 0
    test_truth = {m: t[500:] for m, t in data.truth.items()}
    return SimpleNamespace(root=root, run=run, data=data, test=root / "test.h5ad",
                           train=root / "train.h5ad", truth=test_truth)  # fmt: skip
