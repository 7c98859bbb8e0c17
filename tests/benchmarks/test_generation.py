"""``latentcell benchmark generation`` end to end at toy sizes: a stratified held-out split,
one VAE + DiT per training seed, every method over every (training, sampling) seed pair, the
memorization check, results.json/.md, the figure and one MLflow run; bad input in one line."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from mlflow.tracking import MlflowClient

from latentcell.benchmarks.generation import METHODS
from latentcell.launch.cli import main

TINY = ["--vae-steps", "6", "--dit-steps", "6", "--steps", "3", "--set", "vae.train.eval_every=0"]


def _cells(path, n_per_group=70, seed=0):
    """Two cell types x two stimulations, each group with its own mean expression."""
    rng = np.random.default_rng(seed)
    groups = [("A", "ctrl"), ("A", "stim"), ("B", "ctrl"), ("B", "stim")]
    X, obs = [], []
    for k, (ct, st) in enumerate(groups):
        rates = rng.gamma(2.0, 1.0 + k, size=40)
        X.append(rng.poisson(rates, size=(n_per_group, 40)))
        obs += [(ct, st)] * n_per_group
    adata = ad.AnnData(
        X=sp.csr_matrix(np.vstack(X).astype(np.float32)),
        obs=pd.DataFrame(obs, columns=["cell_type", "stim"]),
    )
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"g{j}" for j in range(40)]
    adata.write_h5ad(path)
    return path


def test_benchmark_runs_over_training_and_sampling_seeds(tmp_path):
    data = _cells(tmp_path / "cells.h5ad")
    out = tmp_path / "bench"
    argv = ["benchmark", "generation", "--data", str(data), "--condition-col", "cell_type,stim",
            "--classifier-col", "cell_type", "--out", str(out), "--train-seeds", "0,1",
            "--sampling-seeds", "0,1", *TINY]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["condition_columns"] == ["cell_type", "stim"]
    assert len(results["conditions"]) == 4 and results["n_heldout"] == 4 * 21
    assert results["n_train"] + results["n_heldout"] == 280
    assert len(results["runs"]) == 4  # 2 training seeds x 2 sampling seeds
    for method in METHODS:
        entry = results["table"][method]["knn_auc"]
        assert entry["n"] == 4 and 0.0 <= entry["mean"] <= 1.0
    assert set(results["table"]["generated"]["knn_auc"]["per_train_seed"]) == {"0", "1"}
    # the ceiling is two sets of real cells of the same groups: far closer than the VAE prior
    table = results["table"]
    assert (
        table["real_ceiling"]["energy_distance"]["mean"]
        < table["vae_prior"]["energy_distance"]["mean"]
    )
    assert np.isfinite(table["generated"]["latent_nn_ratio"]["mean"])
    assert set(results["verdict"]) >= {"knn_auc_margin", "beats_gaussian"}
    assert (out / "figures" / "knn_auc_energy.png").stat().st_size > 0
    assert "| knn_auc |" in (out / "results.md").read_text()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentcell")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`latentcell.benchmark` = 'generation'"
    )
    assert len(runs) == 1
    assert runs[0].data.metrics["generated/knn_auc"] == pytest.approx(
        table["generated"]["knn_auc"]["mean"]
    )


def test_held_out_split_is_stratified_and_keeps_a_training_cell(tmp_path):
    import argparse

    from latentcell.benchmarks.generation_steps import load_cells, split_held_out

    path = tmp_path / "cells.h5ad"
    adata = ad.read_h5ad(_cells(path, n_per_group=10))
    adata = adata[np.r_[0:10, 10:11, 20:30, 30:40]].copy()  # ("A", "stim") has one cell
    adata.write_h5ad(path)
    args = argparse.Namespace(data=str(path), condition_col="cell_type,stim", classifier_col=None)
    split = split_held_out(load_cells(args, tmp_path), 0.3, tmp_path)
    held = split.held.obs.groupby(["cell_type", "stim"], observed=True).size().to_dict()
    assert held == {("A", "ctrl"): 3, ("B", "ctrl"): 3, ("B", "stim"): 3}
    assert (split.train.obs["stim"] == "stim").sum() == 1 + 7


def test_missing_condition_column_is_one_line(tmp_path, capsys):
    data = _cells(tmp_path / "cells.h5ad")
    argv = ["benchmark", "generation", "--data", str(data), "--condition-col", "cell_type,dose",
            "--out", str(tmp_path / "bench"), *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "obs['dose']" in err and "cells.h5ad" in err


def test_classifier_column_must_be_a_function_of_the_groups(tmp_path, capsys):
    path = _cells(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(path)
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2 == 0, "d1", "d2")
    adata.write_h5ad(path)
    argv = ["benchmark", "generation", "--data", str(path), "--condition-col", "cell_type",
            "--classifier-col", "donor", "--out", str(tmp_path / "bench"),
            "--sampling-seeds", "0", *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "obs['donor']" in err and "--condition-col" in err
