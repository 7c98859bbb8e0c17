"""The latent-diffusion stage end to end on the real small Zarr store: a tiny VAE, then a tiny
DiT trained through the real loop on that VAE's latents.

Covered: the latent store and ``latent_stats.json`` that ``prepare_data`` writes (latents are
the VAE's posterior means, statistics come from the training cells only); the held-out loss
falls; the saved model card rebuilds the model and loads the EMA weights; the latent store is
reused while store and VAE are unchanged and rebuilt when the VAE changes (another run, or the
same run retrained); configuration and data errors; and one run tracked in MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.cell_split import stratified_cell_split
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.latent_store import LatentStoreReader
from latentcell.data_pipelines.stores import open_store
from latentcell.inference.trained_runs import load_vae
from latentcell.trainer.config import ConfigError, load_config
from latentcell.trainer.dit_stage import (
    DenoiserStep,
    DiTRunConfig,
    DiTStage,
    build_latent_diffusion,
)
from latentcell.trainer.loop import fit
from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

N_LATENT = 4
VAL_FRACTION = 0.25


def _reset_accelerate() -> None:
    """Two runs in one fixture need a fresh Accelerate state in between (see conftest)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_vae(store: Path, run_dir: Path, *overrides: str) -> Path:
    config = load_config(
        VAERunConfig,
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            "data.batch_size=128",
            f"model.n_latent={N_LATENT}",
            "model.n_hidden=32",
            "model.kl_warmup_steps=20",
            "optim.lr=3e-3",
            "train.max_steps=60",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.progress=false",
            "tracking.enabled=false",
            *overrides,
        ],
    )
    fit(VAEStage(config), config)
    _reset_accelerate()
    return run_dir


def dit_config(store: Path, run_dir: Path, vae_run: Path | str, *overrides: str) -> DiTRunConfig:
    return load_config(
        DiTRunConfig,
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            f"vae.run={vae_run}",
            f"data.val_fraction={VAL_FRACTION}",
            "data.batch_size=128",
            "model.hidden=32",
            "model.depth=1",
            "model.heads=2",
            "model.patch_size=2",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "train.max_steps=100",
            "train.eval_every=4",
            "train.checkpoint_every=0",
            "train.progress=false",
            "tracking.enabled=false",
            "tracking.log_model=false",
            *overrides,
        ],
    )


def posterior_means(vae_run: Path, store: Path, rows: np.ndarray) -> np.ndarray:
    """``vae.encode`` of the store's cells ``rows``, computed here from dense counts."""
    vae, _ = load_vae(vae_run)
    reader = open_store(store)
    blocks = [reader.read_rows(int(r), int(r) + 1) for r in rows]
    X = torch.from_numpy(np.concatenate([b.X.toarray() for b in blocks]))
    library = torch.from_numpy(np.concatenate([b.library_size for b in blocks]))
    with torch.no_grad():
        return vae.encode(X, library)[0].numpy()


def stored_latents(run_dir: Path, rows: np.ndarray) -> np.ndarray:
    reader = LatentStoreReader(run_dir / "latents")
    return np.concatenate([reader.read_rows(int(r), int(r) + 1).X for r in rows])


def manifest_mtime(run_dir: Path) -> int:
    return (run_dir / "latents" / "manifest.json").stat().st_mtime_ns


ROWS = np.array([0, 1, 517, 1199])


@pytest.fixture(scope="module")
def runs(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_stage")
    vae = train_vae(small_store, root / "vae")
    config = dit_config(small_store, root / "dit", vae)
    result = fit(DiTStage(config), config)
    _reset_accelerate()
    return SimpleNamespace(root=root, store=small_store, vae=vae, dit=root / "dit", result=result)


def test_prepare_data_writes_the_vae_latents_and_their_stats(runs):
    latents = LatentStoreReader(runs.dit / "latents")
    meta = latents.meta
    assert meta.n_cells == 1200 and meta.n_genes == N_LATENT
    np.testing.assert_allclose(
        stored_latents(runs.dit, ROWS), posterior_means(runs.vae, runs.store, ROWS), atol=1e-5
    )

    stats = json.loads((runs.dit / "latent_stats.json").read_text())
    assert stats["vae"] == {
        "vae_run": str(runs.vae.absolute()),
        "weights": "model.safetensors",
        "weights_sha256": sha256_file(runs.vae / "final" / "model.safetensors"),
    }
    assert stats["genes"]["gene_key"] == list(open_store(runs.store).meta.var.index)
    assert stats["latents"] == str((runs.dit / "latents").absolute())
    # the statistics describe the training cells only: split_by=auto holds out cells of this
    # 12-unit store, stratified by its roles (the condition, cell_type, is one)
    train, _ = stratified_cell_split(open_store(runs.store), (), VAL_FRACTION, 0)
    z = latents.read_rows(0, 1200).X[train].astype(np.float64)
    assert stats["n_cells"] == len(z) and 880 <= len(z) <= 920  # about 75% of 1,200
    np.testing.assert_allclose(stats["latent_shift"], z.mean(axis=0), rtol=1e-6, atol=1e-7)
    assert stats["latent_scale"] == pytest.approx(1 / np.std(z - z.mean(axis=0)), rel=1e-6)
    assert stats["library"]["columns"] == ["cell_type"]
    assert stats["library"]["batch_column"] == "batch"  # the VAE decodes per batch
    assert sum(g["n_cells"] for g in stats["library"]["groups"]) == len(train)


def test_validation_loss_falls(runs):
    history = (runs.dit / "metrics.jsonl").read_text().splitlines()
    val = [json.loads(line)["val/loss"] for line in history if "val/loss" in line]
    assert len(val) == 25  # every 4 steps, and at the end
    assert val[-1] < val[0] - 0.015, val
    assert runs.result.step == 100 and runs.result.val_metrics["val/loss"] == val[-1]


def test_summary_reports_the_latent_memorization_check(runs):
    """The stage's final_report: sampled latents against the training latents, per cell type
    (a 100-step DiT on ~900 cells is far from copying them)."""
    checks = json.loads((runs.dit / "summary.json").read_text())["checks"]
    assert set(checks) == {"memorization/latent_nn_ratio"}
    assert 0.5 < checks["memorization/latent_nn_ratio"] < 5.0


def test_model_card_rebuilds_the_model_and_loads_the_ema(runs):
    final = runs.dit / "final"
    card = json.loads((final / "model_config.json").read_text())
    stats = json.loads((runs.dit / "latent_stats.json").read_text())
    assert card["categories"] == {"cell_type": open_store(runs.store).meta.categories["cell_type"]}
    assert card["vae"] == stats["vae"] and card["config"]["dit"]["n_latent"] == N_LATENT

    model = build_latent_diffusion(card, stats)
    model.load_state_dict(load_file(str(final / "ema.safetensors")))
    assert torch.equal(model.latent_shift, torch.tensor(stats["latent_shift"]))
    assert model.latent_scale.item() == pytest.approx(stats["latent_scale"])
    trained = load_file(str(final / "model.safetensors"))
    assert trained.keys() == model.state_dict().keys()

    codes = torch.tensor([[0], [1], [2]])  # T cell, B cell, null (unconditional)
    z = model.sample(codes, torch.zeros(3, 0), steps=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, N_LATENT) and torch.isfinite(z).all()

    # the serving form: one denoiser call on [codes | x_t | t]
    x, t = torch.randn(3, N_LATENT), torch.full((3,), 0.5)
    with torch.no_grad():
        served = DenoiserStep(model).eval()(torch.cat([codes.float(), x, t[:, None]], dim=1))
        direct = model.dit(x, t, codes, torch.zeros(3, 0))
    torch.testing.assert_close(served, direct)


def test_latents_are_reused_until_the_vae_changes(runs, tmp_path):
    # unchanged store and VAE: the latent store is not rewritten
    before = manifest_mtime(runs.dit)
    stats = (runs.dit / "latent_stats.json").read_text()
    DiTStage(dit_config(runs.store, runs.dit, runs.vae)).prepare_data(True)
    assert manifest_mtime(runs.dit) == before
    assert json.loads((runs.dit / "latent_stats.json").read_text()) == json.loads(stats)

    # another VAE run: rebuilt with its latents
    run_dir = tmp_path / "dit"
    DiTStage(dit_config(runs.store, run_dir, runs.vae)).prepare_data(True)
    other = train_vae(runs.store, tmp_path / "vae", "train.max_steps=5", "train.seed=1")
    first = manifest_mtime(run_dir)
    DiTStage(dit_config(runs.store, run_dir, other)).prepare_data(True)
    assert manifest_mtime(run_dir) != first
    provenance = LatentStoreReader(run_dir / "latents").provenance()["encoder"]
    assert provenance["vae_run"] == str(other.absolute())
    np.testing.assert_allclose(
        stored_latents(run_dir, ROWS), posterior_means(other, runs.store, ROWS), atol=1e-5
    )

    # the same VAE run retrained in place (another seed): rebuilt again
    second = manifest_mtime(run_dir)
    train_vae(runs.store, other, "train.max_steps=5", "train.seed=2")
    DiTStage(dit_config(runs.store, run_dir, other)).prepare_data(True)
    assert manifest_mtime(run_dir) != second
    np.testing.assert_allclose(
        stored_latents(run_dir, ROWS), posterior_means(other, runs.store, ROWS), atol=1e-5
    )
    stats = json.loads((run_dir / "latent_stats.json").read_text())
    assert stats["vae"]["weights_sha256"] == sha256_file(other / "final" / "model.safetensors")


def test_separate_validation_store_is_encoded_and_used(runs, tmp_path):
    """data.val_path: its cells are encoded into val_latents and validate the DiT, and the
    whole of data.path trains (no unit split)."""
    config = dit_config(
        runs.store, tmp_path / "dit", runs.vae, f"data.val_path={runs.store}",
        "train.max_steps=2", "train.eval_every=0",
    )  # fmt: skip
    result = fit(DiTStage(config), config)
    _reset_accelerate()
    val = LatentStoreReader(tmp_path / "dit" / "val_latents")
    assert val.meta.n_cells == 1200
    np.testing.assert_allclose(
        np.concatenate([val.read_rows(int(r), int(r) + 1).X for r in ROWS]),
        posterior_means(runs.vae, runs.store, ROWS),
        atol=1e-5,
    )
    assert json.loads((tmp_path / "dit" / "latent_stats.json").read_text())["n_cells"] == 1200
    assert np.isfinite(result.val_metrics["val/loss"])


def test_missing_vae_run_is_a_config_error(runs, tmp_path):
    stage = DiTStage(dit_config(runs.store, tmp_path / "dit", ""))
    with pytest.raises(ConfigError, match="vae.run is required"):
        stage.prepare_data(True)
    assert not (tmp_path / "dit").exists()


def test_unknown_condition_names_the_available_columns(runs, tmp_path):
    config = dit_config(runs.store, runs.dit, runs.vae, 'model.conditions=["tissue"]')
    with pytest.raises(ConfigError, match="tissue") as err:
        DiTStage(config).prepare_data(True)
    assert "available: ['batch', 'cell_type', 'guide_id', 'target_gene']" in str(err.value)
    # role names resolve to their columns
    config = dit_config(runs.store, runs.dit, runs.vae, 'model.conditions=["perturbation"]')
    assert DiTStage(config).condition_columns() == ("target_gene",)


def test_vae_of_another_gene_count_is_a_data_error(runs, tmp_path):
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    synthesize(SynthConfig(n_cells=100, n_genes=150, n_cell_types=2, seed=3), tmp_path / "x.h5ad")
    store = tmp_path / "x.zarr"
    build_store([tmp_path / "x.h5ad"], store, format="zarr", schema="vcc")
    stage = DiTStage(dit_config(store, tmp_path / "dit", runs.vae))
    with pytest.raises(DataValidationError, match="the store has 150 genes.*trained on 200"):
        stage.prepare_data(True)
    assert not (tmp_path / "dit" / "latents").exists()


def test_tracked_run_logs_metrics_and_the_model(runs, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = dit_config(
        runs.store,
        tmp_path / "dit",
        runs.vae,
        "train.max_steps=10",
        "train.eval_every=0",
        "tracking.log_every=5",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.log_model=true",
    )
    result = fit(DiTStage(config), config)
    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "dit"
    assert run.data.params["model.patch_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [5, 10]
    assert "model_card" in {a.path for a in client.list_artifacts(run.info.run_id)}
    ratio = float(run.data.tags["check/memorization/latent_nn_ratio"])  # a tag, not a chart
    assert not any(k.startswith(("check/", "final/")) for k in run.data.metrics)
    assert "figures/generated_pca.png" in {
        a.path for a in client.list_artifacts(run.info.run_id, "figures")
    }
    summary = json.loads((tmp_path / "dit" / "summary.json").read_text())
    assert ratio == pytest.approx(summary["checks"]["memorization/latent_nn_ratio"], rel=1e-5)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == runs.store.name and dataset.tags[0].value == "training"
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(logged) == 1 and logged[0].source_run_id == run.info.run_id
