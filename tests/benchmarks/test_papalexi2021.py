"""The zero-shot experiment's gene vectors come from TRAINING cells only: changing every
held-out target's cells leaves them unchanged, and the ST's external encoder reads them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from latentcell.benchmarks.papalexi2021 import training_gene_vectors
from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize
from latentcell.models.perturbation_encoders import PerturbationEncoderConfig, load_gene_vectors


def test_gene_vectors_use_training_cells_only(tmp_path):
    import anndata as ad

    h5ad = tmp_path / "cells.h5ad"
    synthesize(
        SynthConfig(n_cells=600, n_genes=60, n_perturbations=4, n_cell_types=1, seed=3), h5ad
    )
    adata = ad.read_h5ad(h5ad)
    held = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})[0]
    split = tmp_path / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n"
        f'[split.perturbations]\ntest = ["{held}"]\n'
    )
    store = tmp_path / "store.zarr"
    build_store([h5ad], store, schema="vcc")
    first = training_gene_vectors(adata, store, split, tmp_path / "a.npz")

    changed = adata.copy()
    rows = (changed.obs["target_gene"] == held).to_numpy()
    X = sp.csr_matrix(changed.X, dtype=np.float32).toarray()
    X[rows] = X[rows] * 10 + 1
    changed.X = sp.csr_matrix(X)
    second = training_gene_vectors(changed, store, split, tmp_path / "b.npz")
    with np.load(first) as a, np.load(second) as b:
        np.testing.assert_array_equal(a["genes"], b["genes"])
        np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-5)
        assert held in a["genes"].tolist()
        assert (np.abs(a["vectors"]).max(1) > 0).all()  # no zero vector: zero means control
        np.testing.assert_allclose(np.sqrt((a["vectors"] ** 2).mean(1)), 1.0, rtol=1e-4)
    labels = sorted(set(adata.obs["target_gene"].astype(str)) - {"non-targeting"})
    config = PerturbationEncoderConfig(kind="external", embeddings_file=str(first))
    assert load_gene_vectors(config.embeddings_file, labels).shape == (len(labels), 10)
