"""The ST stage end to end on the real small Zarr store: split assignment saved with the run,
training through the real loop on the training rows only, the model card rebuilding the
model, fine-tuning from another run's weights, and the prediction file (real controls plus
predicted cells with cell-level variation, in the controls file's gene order)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.st_model import STModel
from latentcell.trainer.config import load_config
from latentcell.trainer.loop import fit
from latentcell.trainer.predict import PopulationRequest, predict_population
from latentcell.trainer.st_predictor import STPredictor
from latentcell.trainer.st_stage import SetPredictor, STRunConfig, STStage, load_matching


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def st_config(store, run_dir, split_file, *overrides: str) -> STRunConfig:
    return load_config(STRunConfig, None, [
        f"data.path={store}", f"run.dir={run_dir}", f"split.file={split_file}",
        "data.set_size=16", "data.sets_per_batch=4", "model.hidden=32", "model.depth=1",
        "model.heads=2", "train.max_steps=12", "train.eval_every=6", "train.eval_batches=2",
        "train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false",
        "tracking.log_model=false", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def st_run(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("st_stage")
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.2\ntest_fraction = 0.2\n")
    config = st_config(small_store, root / "st", split)
    result = fit(STStage(config), config)
    _reset_accelerate()
    return SimpleNamespace(
        root=root, store=small_store, split=split, dir=root / "st", result=result
    )


def test_split_is_saved_and_training_reads_train_rows_only(st_run):
    with np.load(st_run.dir / "split.npz") as f:
        rows = {k: f[k] for k in ("train", "val", "test")}
    assert not set(rows["train"]) & (set(rows["val"]) | set(rows["test"]))
    assert len(rows["train"]) + len(rows["val"]) + len(rows["test"]) == 1200
    summary = json.loads((st_run.dir / "split.json").read_text())
    assert summary  # the assignment's summary travels with the run
    stage = STStage(st_config(st_run.store, st_run.dir, st_run.split))
    seen = set()
    for batch in stage.train_loader(0, 1):
        for side in ("control", "perturbed"):
            seen |= set(batch[side]["row"].reshape(-1).tolist())
    assert seen <= set(rows["train"].tolist())
    assert np.isfinite(st_run.result.val_metrics["val/loss"])


def test_model_card_rebuilds_and_predicts(st_run, small_store):
    predictor = STPredictor(st_run.dir)
    assert predictor.labels[0] == "non-targeting" or "non-targeting" in predictor.labels
    controls = ad.read_h5ad(small_store.parent / "cells.h5ad")
    perts = [p for p in predictor.labels if p != "non-targeting"][:2]
    request = PopulationRequest(tuple(perts), cells_per_perturbation=20, seed=3)
    pred = predict_population(predictor, controls, request, "cells.h5ad")
    n_ctrl = int((controls.obs["target_gene"] == "non-targeting").sum())
    n_types = controls.obs["cell_type"].nunique()
    assert pred.n_obs == n_ctrl + 2 * 20 * n_types
    assert list(pred.var_names) == list(controls.var_names)  # the real data's gene order
    assert set(pred.obs["target_gene"]) == {"non-targeting", *perts}
    X = pred.X.toarray()
    assert np.array_equal(X, np.round(X)) and (X >= 0).all()  # counts, like the real file
    real_ctrl = controls.X[(controls.obs["target_gene"] == "non-targeting").to_numpy()]
    np.testing.assert_array_equal(X[:n_ctrl], real_ctrl.toarray())  # real controls included
    one = X[(pred.obs["target_gene"] == perts[0]).to_numpy()]
    assert np.unique(one, axis=0).shape[0] > 10  # cell-level variation, not copies of a mean
    again = predict_population(predictor, controls, request, "cells.h5ad")
    np.testing.assert_array_equal(again.X.toarray(), X)  # seeded
    with pytest.raises(DataValidationError, match="extend|unknown|not"):
        predict_population(predictor, controls, PopulationRequest(("NOT_A_GENE",), 5), "cells.h5ad")


def test_fine_tuning_starts_from_another_runs_weights(st_run, tmp_path):
    config = st_config(st_run.store, tmp_path / "ft", st_run.split, f"init.run={st_run.dir}")
    stage = STStage(config)
    stage.prepare_data(True)
    model = stage.build_model()
    pretrained = STPredictor(st_run.dir, "model").model.state_dict()
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), pretrained[name].numpy())
    with pytest.raises(DataValidationError, match="no tensor matches"):
        load_matching(torch.nn.Linear(3, 3), st_run.dir)


def test_latent_space_model_and_latent_arithmetic_baseline(st_run, small_store, tmp_path):
    """space=latent trains on the count VAE's latents and predicts genes through its decoder;
    the scGen baseline shares that VAE. A batch-aware VAE is refused with the fix."""
    from latentcell.evaluation.perturbation_baselines import fit_baseline
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    vae = load_config(VAERunConfig, None, [
        f"data.path={small_store}", f"run.dir={tmp_path / 'vae'}", "model.n_latent=4",
        "model.n_hidden=32", "model.batch_conditioning=false", "train.max_steps=20",
        "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
        "tracking.enabled=false", "data.batch_size=128",
    ])  # fmt: skip
    fit(VAEStage(vae), vae)
    _reset_accelerate()
    config = st_config(
        small_store, tmp_path / "st", st_run.split, "model.space=latent",
        f"vae.run={tmp_path / 'vae'}", "train.max_steps=4", "train.eval_every=0",
    )  # fmt: skip
    stage = STStage(config)
    fit(stage, config)
    _reset_accelerate()
    assert stage.model_config().n_features == 4

    controls = ad.read_h5ad(small_store.parent / "cells.h5ad")
    predictor = STPredictor(tmp_path / "st")
    perts = [p for p in predictor.labels if p != "non-targeting"][:1]
    pred = predict_population(predictor, controls, PopulationRequest(tuple(perts), 10), "c")
    assert pred.n_vars == controls.n_vars and np.isfinite(pred.X.toarray()).all()

    train = controls[controls.obs["target_gene"].isin(["non-targeting", perts[0]])].copy()
    scgen = fit_baseline("latent", train, [], vae_run=str(tmp_path / "vae"))
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (3, controls.n_vars)).astype(np.float32))
    out = scgen.predict(x, perts[0], str(train.obs["cell_type"].iloc[0]))
    assert out.shape == x.shape and (out >= 0).all()
    # on the prediction path (library sizes given) decoded cells are SAMPLED from the VAE's
    # likelihood at each control's library: whole counts, varying from cell to cell
    from latentcell.models.expression import TARGET_SUM

    library = np.array([500.0, 2000.0, 8000.0])
    cells = scgen.predict(x, perts[0], "", library, np.random.default_rng(0))
    counts = np.expm1(cells) * library[:, None] / TARGET_SUM
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-2)
    assert not np.allclose(cells, out)
    with pytest.raises(DataValidationError, match="seen in training"):
        scgen.predict(x, "UNSEEN", "")

    batchy = load_config(VAERunConfig, None, [
        f"data.path={small_store}", f"run.dir={tmp_path / 'vae_b'}", "model.n_latent=4",
        "model.n_hidden=16", "train.max_steps=2", "train.eval_every=0",
        "train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false",
    ])  # fmt: skip
    fit(VAEStage(batchy), batchy)
    _reset_accelerate()
    bad = st_config(small_store, tmp_path / "st2", st_run.split, "model.space=latent",
                    f"vae.run={tmp_path / 'vae_b'}")  # fmt: skip
    with pytest.raises(DataValidationError, match="batch_conditioning=false"):
        STStage(bad).prepare_data(True)


def test_vocabulary_tables_load_only_for_the_same_vocabulary(st_run, tmp_path):
    stage = STStage(st_config(st_run.store, tmp_path / "v", st_run.split))
    stage.prepare_data(True)
    model = STModel(stage.model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    card = STPredictor(st_run.dir, "model").card
    other = {**card["categories"], "perturbation": ["non-targeting", "X", "Y", "Z", "W"]}
    load_matching(model, st_run.dir, card["genes"], other)
    trained = STPredictor(st_run.dir, "model").model.state_dict()
    after = model.state_dict()
    assert torch.equal(after["perturbation.table.weight"], before["perturbation.table.weight"])
    assert torch.equal(after["cell_type.weight"], trained["cell_type.weight"])
    assert torch.equal(after["head.weight"], trained["head.weight"])
    with pytest.raises(DataValidationError, match="another gene vocabulary"):
        load_matching(model, st_run.dir, card["genes"][::-1], card["categories"])


def test_serving_form_matches_predict(st_run):
    model = STPredictor(st_run.dir).model
    control = torch.rand(2, 5, model.config.n_features)
    packed = torch.cat([torch.zeros(2, 5, 2), control], dim=-1)
    packed[:, :, 0] = torch.tensor([[1.0], [2.0]])
    packed[1, :, 1] = 1.0
    with torch.no_grad():
        served = SetPredictor(model)(packed)
        direct = model.predict(control, torch.tensor([1, 2]), cell_type=torch.tensor([0, 1]))
    torch.testing.assert_close(served, direct)


def test_train_basal_stores_the_training_control_mean(st_run, small_store, tmp_path):
    """model.basal=train: the stage fills control_mean with the mean log1p features of the
    TRAINING controls per cell type (checked against the h5ad, cell by cell)."""
    from latentcell.data_pipelines.stores import open_store
    from latentcell.trainer.predict import log1p_normalize

    config = st_config(small_store, tmp_path / "basal", st_run.split, "model.basal=train")
    stage = STStage(config)
    stage.prepare_data(True)
    model = stage.build_model()
    reader = open_store(small_store)
    train = stage.split_rows()["train"]
    block = reader.read_rows(0, reader.meta.n_cells)
    meta = reader.meta
    pert = block.codes[meta.roles["perturbation"]]
    ctype = block.codes[meta.roles["cell_type"]]
    control = meta.categories[meta.roles["perturbation"]].index(meta.control_label)
    x = log1p_normalize(block.X.toarray(), block.library_size)
    for t in range(len(meta.categories[meta.roles["cell_type"]])):
        rows = np.intersect1d(train, np.flatnonzero((pert == control) & (ctype == t)))
        assert len(rows) > 0
        np.testing.assert_allclose(model.control_mean[t].numpy(), x[rows].mean(0), atol=1e-5)


def test_predictor_refuses_a_perturbation_the_split_kept_out_of_training(small_store, tmp_path):
    """A onehot vector of a held-out perturbation was never trained: predict says so and
    names the fix, instead of predicting from its random initialisation."""
    split = tmp_path / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.2\ntest_fraction = 0.0\n"
        "[split.perturbations]\nn_test = 1\n"
    )
    config = st_config(
        small_store, tmp_path / "zs", split, "train.max_steps=2", "train.eval_every=0"
    )
    fit(STStage(config), config)
    _reset_accelerate()
    predictor = STPredictor(tmp_path / "zs")
    held = json.loads((tmp_path / "zs" / "split.json").read_text())["held_out"][
        "test_perturbations"
    ]
    assert len(held) == 1 and held[0] not in predictor.trained
    seen = [p for p in predictor.trained if p != "non-targeting"]
    control = np.zeros((4, len(predictor.genes)), np.float32)
    assert predictor.predict(control, seen[0], predictor.cell_types[0]).shape == control.shape
    with pytest.raises(DataValidationError, match="never trained.*perturbation_encoder=external"):
        predictor.predict(control, held[0], predictor.cell_types[0])
