"""Synthetic data: schemas, count statistics, determinism and recovery of the known effects."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest

from latentcell.data_pipelines import synth
from latentcell.data_pipelines.synth import (
    CONTROL_LABEL,
    SynthConfig,
    make_ground_truth,
    sample_negative_binomial,
    simulate_rows,
    synthesize,
)

# Enough cells per perturbation (~500) for tight means; 300 genes keep it well under a second.
VCC = SynthConfig(
    schema="vcc",
    n_cells=3000,
    n_genes=300,
    n_perturbations=4,
    n_cell_types=2,
    n_batches=2,
    seed=3,
    control_fraction=0.3,
    compression="none",
)
SCB = SynthConfig(
    schema="scbasecount",
    n_cells=1500,
    n_genes=200,
    n_cell_types=3,
    n_batches=3,
    seed=5,
    chunk_cells=1024,  # two chunks: obs parts must concatenate into one categorical
)


@pytest.fixture(scope="module")
def vcc(tmp_path_factory):
    path = synthesize(VCC, tmp_path_factory.mktemp("vcc") / "vcc.h5ad")
    return anndata.read_h5ad(path)


@pytest.fixture(scope="module")
def scb(tmp_path_factory):
    return anndata.read_h5ad(synthesize(SCB, tmp_path_factory.mktemp("scb") / "scb.h5ad"))


def _normalized(adata) -> np.ndarray:
    X = adata.X.toarray()
    return X / X.sum(axis=1, keepdims=True)


def _predicted_shares(adata, mask, pert: int | None, seed: int = 0) -> np.ndarray:
    """Mean softmax share per gene for the cells in ``mask``, from the true parameters.

    Uses the cells' own cell types and batches with fresh latent noise, so it predicts what
    the generator should produce without looking at the counts.
    """
    t = adata.uns["latentcell_synth"]
    rng = np.random.default_rng(seed)
    ct = adata.obs["cell_type"].cat.codes.to_numpy()[mask]
    batch = adata.obs["batch"].cat.codes.to_numpy()[mask]
    noise = VCC.cell_noise_scale * rng.standard_normal((ct.size, VCC.latent_dim))
    z = t["cell_type_centers"][ct] + noise
    if pert is not None:
        z = z + t["perturbation_shifts"][pert]
    eta = z @ t["loadings"].T + t["baseline"] + t["batch_effects"][batch]
    if pert is not None:
        eta[:, t["perturbation_targets"][pert]] += np.log(t["knockdown"][pert])
    e = np.exp(eta - eta.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).mean(axis=0)


# ----------------------------------------------------------------------------- schemas


def test_vcc_schema(vcc):
    assert list(vcc.obs.columns) == ["target_gene", "guide_id", "batch", "cell_type"]
    targets = vcc.obs["target_gene"]
    assert CONTROL_LABEL in targets.cat.categories
    assert 0.25 < (targets == CONTROL_LABEL).mean() < 0.35
    perturbations = set(targets.cat.categories) - {CONTROL_LABEL}
    assert len(perturbations) == VCC.n_perturbations and perturbations <= set(vcc.var_names)
    guide_prefix = vcc.obs["guide_id"].astype(str).str.rsplit("_g", n=1).str[0]
    assert (guide_prefix == targets.astype(str)).all()
    assert vcc.obs["guide_id"].nunique() == (VCC.n_perturbations + 1) * VCC.guides_per_target
    assert vcc.var["gene_id"].is_unique and vcc.var["gene_id"].str.match(r"^ENSG\d{11}$").all()
    assert vcc.obs_names.is_unique and vcc.var_names.is_unique
    assert vcc.obs["batch"].nunique() == VCC.n_batches
    assert all(isinstance(dtype, pd.CategoricalDtype) for dtype in vcc.obs.dtypes)
    assert vcc.uns["source"].startswith("latentcell synthetic data")


def test_counts_are_nonnegative_float32_integers(vcc, scb):
    for adata in (vcc, scb):
        data = adata.X.data
        assert adata.X.dtype == np.float32
        assert (data > 0).all() and (data == np.round(data)).all()


def test_scbasecount_schema(scb):
    expected = {
        "SRX_accession",
        "cell_type",
        "cell_ontology_term_id",
        "gene_count_Unique",
        "umi_count_Unique",
    }
    assert set(scb.obs.columns) == expected
    assert scb.var_names.str.match(r"^ENSG\d{11}$").all()
    assert scb.var["gene_symbols"].is_unique
    X = scb.X
    np.testing.assert_array_equal(scb.obs["umi_count_Unique"], np.asarray(X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(scb.obs["gene_count_Unique"], np.diff(X.indptr))
    assert scb.obs["SRX_accession"].nunique() == SCB.n_batches
    assert scb.obs["cell_ontology_term_id"].str.startswith("CL:").all()
    for column in ("SRX_accession", "cell_type", "cell_ontology_term_id"):
        assert isinstance(scb.obs[column].dtype, pd.CategoricalDtype), column


def test_ground_truth_in_uns(vcc):
    t = vcc.uns["latentcell_synth"]
    g, d = VCC.n_genes, VCC.latent_dim
    assert t["loadings"].shape == (g, d)
    assert t["batch_effects"].shape == (VCC.n_batches, g)
    assert t["perturbation_shifts"].shape == (VCC.n_perturbations, d)
    assert list(vcc.var_names[t["perturbation_targets"]]) == list(t["perturbation_names"])
    assert ((t["knockdown"] >= 0.1) & (t["knockdown"] <= 0.3)).all()
    assert t["config"]["seed"] == VCC.seed and t["control_label"] == CONTROL_LABEL


def test_vcc_without_perturbations_is_all_controls(tmp_path):
    config = SynthConfig(n_cells=300, n_genes=50, n_perturbations=0, n_batches=1, seed=1)
    adata = anndata.read_h5ad(synthesize(config, tmp_path / "c.h5ad"))
    assert (adata.obs["target_gene"] == CONTROL_LABEL).all()


# ----------------------------------------------------------------------------- statistics


def test_density_and_library_at_defaults():
    """A benchmark relies on ~10% non-zero entries at 2000 genes and realistic libraries."""
    config = SynthConfig(n_cells=2048, seed=11)
    X = simulate_rows(make_ground_truth(config), config, 0, config.n_cells).X
    assert X.shape == (2048, 2000)
    assert 0.08 < X.nnz / (X.shape[0] * X.shape[1]) < 0.125
    assert 1500 < np.median(np.asarray(X.sum(axis=1))) < 4000


@pytest.mark.parametrize(("mu", "theta"), [(0.05, 0.5), (0.8, 2.0), (6.0, 0.7), (60.0, 3.0)])
def test_negative_binomial_moments(mu, theta):
    """Both sampler paths (inversion, gamma-Poisson) match NB mean, P(0) and variance."""
    n = 40_000
    rng = np.random.default_rng(0)
    x = sample_negative_binomial(np.full((n, 1), mu), np.array([theta]), rng).toarray().ravel()
    var = mu + mu**2 / theta
    assert abs(x.mean() - mu) < 5 * np.sqrt(var / n)
    p0 = (theta / (theta + mu)) ** theta
    assert abs((x == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / n) + 1e-4
    assert abs(x.var() / var - 1) < 0.1


# ----------------------------------------------------------------------------- determinism


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_config_same_bytes_any_chunk_size(tmp_path):
    config = SynthConfig(n_cells=2500, n_genes=100, n_perturbations=5, seed=7, chunk_cells=1024)
    a = synthesize(config, tmp_path / "a.h5ad")
    b = synthesize(config, tmp_path / "b.h5ad")
    assert _digest(a) == _digest(b)
    rechunked = synthesize(dataclasses.replace(config, chunk_cells=8192), tmp_path / "c.h5ad")
    x, y = anndata.read_h5ad(a), anndata.read_h5ad(rechunked)
    assert (x.X != y.X).nnz == 0 and x.obs.equals(y.obs)
    assert all(isinstance(dtype, pd.CategoricalDtype) for dtype in x.obs.dtypes)  # 3 chunks
    other = anndata.read_h5ad(synthesize(dataclasses.replace(config, seed=8), b))
    assert (x.X != other.X).nnz > 0


# ----------------------------------------------------------------------------- known effects


def test_knockdown_reduces_target_as_predicted(vcc):
    t = vcc.uns["latentcell_synth"]
    norm = _normalized(vcc)
    control = (vcc.obs["target_gene"] == CONTROL_LABEL).to_numpy()
    pred_control = _predicted_shares(vcc, control, None)
    for p, name in enumerate(t["perturbation_names"]):
        cells = (vcc.obs["target_gene"] == name).to_numpy()
        g, k = t["perturbation_targets"][p], t["knockdown"][p]
        observed = norm[cells, g].mean() / norm[control, g].mean()
        predicted = _predicted_shares(vcc, cells, p)[g] / pred_control[g]
        assert abs(np.log(observed / predicted)) < 0.25, (name, observed, predicted)
        assert observed < 0.6 and k / 3 < observed < 3 * k  # roughly the knockdown factor


def test_perturbation_shift_matches_true_latent_shift(vcc):
    t = vcc.uns["latentcell_synth"]
    logn = np.log1p(_normalized(vcc) * 1e4)
    control = (vcc.obs["target_gene"] == CONTROL_LABEL).to_numpy()
    expressed = np.asarray(vcc.X.mean(axis=0)).ravel() > 0.5
    for p, name in enumerate(t["perturbation_names"]):
        cells = (vcc.obs["target_gene"] == name).to_numpy()
        observed = logn[cells].mean(axis=0) - logn[control].mean(axis=0)
        predicted = t["loadings"] @ t["perturbation_shifts"][p]
        genes = expressed.copy()
        genes[t["perturbation_targets"][p]] = False
        assert np.corrcoef(observed[genes], predicted[genes])[0, 1] > 0.7, name


def test_batch_effects_visible(vcc):
    t = vcc.uns["latentcell_synth"]
    logn = np.log1p(_normalized(vcc) * 1e4)
    control = (vcc.obs["target_gene"] == CONTROL_LABEL).to_numpy()
    batch = vcc.obs["batch"].cat.codes.to_numpy()
    cell_type = vcc.obs["cell_type"].cat.codes.to_numpy()
    expressed = np.asarray(vcc.X.mean(axis=0)).ravel() > 0.5
    truth = t["batch_effects"][1] - t["batch_effects"][0]
    for c in range(VCC.n_cell_types):  # within a cell type: compositions differ by batch
        in_b = [control & (cell_type == c) & (batch == b) for b in (0, 1)]
        if min(m.sum() for m in in_b) < 50:
            continue
        observed = logn[in_b[1]].mean(axis=0) - logn[in_b[0]].mean(axis=0)
        assert np.corrcoef(observed[expressed], truth[expressed])[0, 1] > 0.7


# ----------------------------------------------------------------------------- split samples


def test_split_samples(tmp_path):
    config = dataclasses.replace(SCB, split_samples=True)
    out = synthesize(config, tmp_path / "samples")
    files = sorted(out.glob("*.h5ad"))
    whole = anndata.read_h5ad(synthesize(SCB, tmp_path / "whole.h5ad"))
    assert [f.stem for f in files] == sorted(whole.obs["SRX_accession"].cat.categories)
    gene_sets, n_cells = [], 0
    for f in files:
        sample = anndata.read_h5ad(f)
        assert set(sample.obs["SRX_accession"]) == {f.stem}
        assert sample.n_vars == SCB.n_genes - round(SCB.gene_drop_fraction * SCB.n_genes)
        rows = whole.obs_names.get_indexer(sample.obs_names)
        cols = whole.var_names.get_indexer(sample.var_names)
        assert (rows >= 0).all() and (cols >= 0).all()
        assert (whole.X[rows][:, cols] != sample.X).nnz == 0  # same cells, genes subset
        umis = np.asarray(sample.X.sum(axis=1)).ravel()
        np.testing.assert_array_equal(sample.obs["umi_count_Unique"], umis)
        gene_sets.append(frozenset(sample.var_names))
        n_cells += sample.n_obs
    assert n_cells == SCB.n_cells and len(set(gene_sets)) == len(files)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_split_samples_refuses_non_empty_destination(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        synthesize(dataclasses.replace(SCB, split_samples=True), tmp_path / "samples")


# ----------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
    "bad",
    [
        {"schema": "h5"},
        {"split_samples": True},  # vcc
        {"n_perturbations": 5000},
        {"n_cells": 2, "n_batches": 3},
        {"knockdown_range": (0.0, 0.3)},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError, match="invalid synthetic data config"):
        SynthConfig(**bad)


def _parse(argv):
    return synth.add_synth_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.h5ad"
    argv = ["--out", str(out), "--cells", "200", "--genes", "40", "--perturbations", "3"]
    assert synth.run_synth(_parse([*argv, "--cell-types", "1", "--batches", "2"])) == 0
    adata = anndata.read_h5ad(out)
    assert adata.shape == (200, 40) and adata.obs["cell_type"].nunique() == 1
    assert synth.run_synth(_parse([*argv, "--split-samples"])) == 2
    assert "error: invalid synthetic data config" in capsys.readouterr().err


# ----------------------------------------------------------------------------- large run


@pytest.mark.slow
def test_large_streamed_run_keeps_memory_flat(tmp_path):
    """200k cells x 2000 genes (~80M non-zeros) streamed in a child process under 1.5 GiB."""
    out = tmp_path / "big.h5ad"
    code = (
        "import resource, sys; from latentcell.data_pipelines.synth import SynthConfig, synthesize;"
        "synthesize(SynthConfig(n_cells=200_000, n_perturbations=150, n_batches=8,"
        " compression='none'), sys.argv[1]);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stdout.split()[-1]) / 1024
    assert peak_mib < 1536, peak_mib
    backed = anndata.read_h5ad(out, backed="r")
    try:
        assert backed.shape == (200_000, 2000)
        # positive bounds: anndata 0.12 backed CSR fails on negative slices (its own files too)
        assert 0.08 < backed.X[195_904:200_000].nnz / (4096 * 2000) < 0.125
    finally:
        backed.file.close()


def test_cell_type_specific_responses(tmp_path):
    """With pert_type_scale > 0 each cell type's observed response follows its own true shift
    (shared + type-specific) better than the shared part alone; every other parameter is the
    same as without it (its own random stream)."""
    config = dataclasses.replace(VCC, n_cells=6000, pert_type_scale=0.8)
    plain = make_ground_truth(VCC)
    truth = make_ground_truth(config)
    assert np.array_equal(plain.loadings, truth.loadings)
    assert np.array_equal(plain.perturbation_shifts, truth.perturbation_shifts)
    assert not plain.perturbation_type_shifts.any()
    assert truth.perturbation_type_shifts.shape == (4, 2, VCC.latent_dim)
    adata = anndata.read_h5ad(synthesize(config, tmp_path / "typed.h5ad"))
    t = adata.uns["latentcell_synth"]
    assert np.allclose(t["perturbation_type_shifts"], truth.perturbation_type_shifts)
    logn = np.log1p(_normalized(adata) * 1e4)
    target = adata.obs["target_gene"].astype(str).to_numpy()
    cell_type = adata.obs["cell_type"].cat.codes.to_numpy()
    expressed = np.asarray(adata.X.mean(axis=0)).ravel() > 0.5
    wins = 0
    for p, name in enumerate(t["perturbation_names"]):
        for c in range(config.n_cell_types):
            cells, controls = (
                (target == name) & (cell_type == c),
                (target == CONTROL_LABEL) & (cell_type == c),
            )
            observed = logn[cells].mean(axis=0) - logn[controls].mean(axis=0)
            genes = expressed.copy()
            genes[t["perturbation_targets"][p]] = False
            own = t["loadings"] @ (
                t["perturbation_shifts"][p] + t["perturbation_type_shifts"][p, c]
            )
            shared = t["loadings"] @ t["perturbation_shifts"][p]
            r_own = np.corrcoef(observed[genes], own[genes])[0, 1]
            r_shared = np.corrcoef(observed[genes], shared[genes])[0, 1]
            assert r_own > 0.6, (name, c, r_own)
            wins += r_own > r_shared
    assert wins >= 7  # of 8 (perturbation, cell type) pairs
