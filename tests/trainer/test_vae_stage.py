"""The count VAE trained through the real loop on a real Zarr store, tracked in a real MLflow
SQLite store: everything a user of `latentcell train vae` gets, checked end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentcell.data_pipelines.stores import open_store
from latentcell.models.count_vae import CountVAE, CountVAEConfig
from latentcell.trainer.config import load_config
from latentcell.trainer.loop import fit
from latentcell.trainer.vae_stage import VAERunConfig, VAEStage


def _config(tmp_path, store, *overrides):
    return load_config(
        VAERunConfig,
        None,
        [
            f"data.path={store}",
            f"run.dir={tmp_path / 'exp' / 'vae'}",
            "data.batch_size=64",
            "model.n_hidden=32",
            "model.kl_warmup_steps=20",
            "train.progress=false",
            "tracking.log_every=10",
            *overrides,
        ],
    )


def test_train_vae_end_to_end_with_mlflow(small_store, tmp_path):
    from mlflow.tracking import MlflowClient

    config = _config(
        tmp_path,
        small_store,
        "train.max_steps=60",
        "train.eval_every=20",
        "train.checkpoint_every=20",
        "optim.lr=3e-3",
    )
    result = fit(VAEStage(config), config)
    run_dir = tmp_path / "exp" / "vae"

    # files of the run
    assert load_config(VAERunConfig, run_dir / "config.toml") == config
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_40", "step_60"]
    card = json.loads((result.final_dir / "model_config.json").read_text())
    model = CountVAE(CountVAEConfig(**card["config"]))
    model.load_state_dict(load_file(str(result.final_dir / "model.safetensors")))
    assert card["config"]["n_genes"] == open_store(small_store).meta.n_genes
    assert card["config"]["n_batches"] == 2  # the store's batch role, read from the data
    assert (run_dir / "training_curves.png").stat().st_size > 1000

    # it learned: held-out ELBO improved between the first and the last validation
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [h["val/elbo"] for h in history if "val/elbo" in h]
    assert len(val) == 3 and val[-1] > val[0] + 10

    # one MLflow run with the whole config, batched metrics, artifacts and the model
    assert result.tracking_uri == f"sqlite:///{(tmp_path / 'exp').resolve()}/mlflow.db"
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "60"
    assert run.data.params["model.likelihood"] == "nb"
    assert run.data.tags["stage"] == "vae"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [10, 20, 30, 40, 50, 60]
    assert len(client.get_metric_history(run.info.run_id, "val/elbo")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "summary.json", "figures", "model_card"} <= artifacts
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(logged) == 1 and logged[0].source_run_id == run.info.run_id

    import mlflow.pytorch

    served = mlflow.pytorch.load_model(logged[0].artifact_location.removeprefix("file://"))
    meta = open_store(small_store).meta
    block = open_store(small_store).read_rows(0, 16)
    counts = torch.from_numpy(block.X.toarray())
    with torch.no_grad():
        expected = model.eval().encode(counts)[0]
        torch.testing.assert_close(served(counts), expected, rtol=1e-4, atol=1e-5)
    assert expected.shape == (16, 10) and meta.n_cells == 1200


def test_unreachable_tracking_server_warns_and_training_completes(
    small_store, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = _config(tmp_path, small_store, "train.max_steps=6", "tracking.uri=http://127.0.0.1:9")
    with pytest.warns(RuntimeWarning, match="127.0.0.1:9"):
        result = fit(VAEStage(config), config)
    assert result.step == 6 and result.mlflow_run_id is None
    assert (result.final_dir / "model.safetensors").exists()


def test_validation_split_holds_out_whole_units(small_store, tmp_path):
    """data.split_by=units (auto would split this 12-unit store by cells)."""
    config = _config(tmp_path, small_store, "data.val_fraction=0.25", "data.split_by=units")
    stage = VAEStage(config)
    train, val = stage.train_loader(0, 1), stage.val_loader(0, 1)
    train_rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for b in train])
    val_rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for b in val])
    assert len(val_rows) == 300 and len(train_rows) == 900  # 3 of 12 chunks of 100 cells
    assert not set(train_rows.tolist()) & set(val_rows.tolist())


@pytest.mark.real_data
def test_vae_learns_paul2015(shared_file, tmp_path):
    """Real counts (Paul 2015 myeloid, 2,660 cells x 3,004 genes): a short run through the
    real loop improves the held-out ELBO by a clear margin."""
    from latentcell.data_pipelines.build import build_store

    store = tmp_path / "paul.zarr"
    build_store(
        [shared_file("paul2015_myeloid_trajectory_counts.h5ad")],
        store,
        schema="auto",
        chunk_cells=100,
    )
    config = _config(
        tmp_path,
        store,
        "train.max_steps=80",
        "train.eval_every=10",
        "data.val_fraction=0.1",
        "data.batch_size=128",
        "optim.lr=3e-3",
        "tracking.enabled=false",
    )
    fit(VAEStage(config), config)
    history = (tmp_path / "exp" / "vae" / "metrics.jsonl").read_text().splitlines()
    val = [json.loads(h)["val/elbo"] for h in history if "val/elbo" in h]
    assert val[-1] > val[0] + 100, val
