"""The Paul 2015 experiment end to end at toy sizes (real data; skipped when absent): every
method lands in the table, and the latent memorization check reads the DiT's own latent
stores (training and validation cells) and the generated cells' ``X_latent``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentcell.evaluation.experiment_paul2015 import CONDITION_LIBRARY, latents_by_label, main


def test_experiment_runs_end_to_end(shared_file, tmp_path):
    data = shared_file("paul2015_myeloid_trajectory_counts.h5ad")
    out = tmp_path / "paul"
    args = ["--out", str(out), "--data", str(data), "--vae-steps", "30", "--dit-steps", "30"]
    assert main([*args, "--seeds", "0", "--steps", "5", "--n-per-type", "60"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {
        "generated",
        CONDITION_LIBRARY,
        "vae_prior",
        "gaussian_pca",
        "real_ceiling",
    }
    assert 0.0 <= results["targets"]["knn_auc_macro"] <= 1.0
    memorization = results["latent_memorization"][0]
    assert set(memorization["per_condition"]) == set(results["conditions"])
    assert results["targets"]["latent_nn_ratio"] == pytest.approx(memorization["macro"])

    train = latents_by_label(out / "dit" / "latents")
    val = latents_by_label(out / "dit" / "val_latents")
    assert sum(len(z) for z in (*train.values(), *val.values())) == results["n_train"]
    assert {z.shape[1] for z in train.values()} == {16}
    assert results["latent_memorization_validation"]["macro"] > 0.5  # unseen real cells
    assert np.isfinite(results["table"]["generated"]["latent_nn_ratio"]["mean"])
