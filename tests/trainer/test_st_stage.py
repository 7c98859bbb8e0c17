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
from latentcell.inference.predict import PopulationRequest, predict_population
from latentcell.inference.st_predictor import STPredictor
from latentcell.models.st_model import STModel
from latentcell.trainer.config import load_config
from latentcell.trainer.loop import fit
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
    config = st_config(small_store, root / "st", split, "model.shift_path=true")
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


def test_vocabulary_tables_map_by_label(st_run, tmp_path):
    """A table over other labels loads only the rows of the labels both have (a row never
    loads under another label's meaning); genes map by key (tests/trainer/test_init_from_run.py)."""
    stage = STStage(st_config(st_run.store, tmp_path / "v", st_run.split, "model.shift_path=true"))
    stage.prepare_data(True)
    model = STModel(stage.model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    card = STPredictor(st_run.dir, "model").card
    other = {**card["categories"], "perturbation": ["non-targeting", "X", "Y", "Z", "W"]}
    load_matching(model, st_run.dir, card["genes"], other)
    trained = STPredictor(st_run.dir, "model").model.state_dict()
    after = model.state_dict()
    control = card["categories"]["perturbation"].index("non-targeting")
    table = after["perturbation.table.weight"]
    assert torch.equal(table[0], trained["perturbation.table.weight"][control])
    assert torch.equal(table[1:], before["perturbation.table.weight"][1:])
    assert torch.equal(after["cell_type.weight"], trained["cell_type.weight"])
    assert torch.equal(after["head.weight"], trained["head.weight"])
    load_matching(model, st_run.dir, card["genes"][::-1], card["categories"])
    assert torch.equal(model.state_dict()["head.weight"], trained["head.weight"].flip(0))
    for name in ("shift_head.weight", "shift_head.bias"):  # gene-indexed: mapped by key too
        assert torch.equal(model.state_dict()[name], trained[name].flip(0))


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


def test_exported_serving_form_marks_untrained_cell_types_nan(st_run):
    """The MLflow serving graph (torch.export, as log_model saves it) cannot raise on a value:
    a set of a cell type without a trained row comes back NaN there, while eager refuses it;
    sets of trained types match eager exactly."""
    model = STPredictor(st_run.dir).model
    model.set_trained_cell_types(torch.tensor([True, False]))
    packed = torch.cat([torch.zeros(2, 5, 2), torch.rand(2, 5, model.config.n_features)], -1)
    packed[:, :, 0] = 1.0
    packed[1, :, 1] = 1.0  # the second set is of the untrained type
    served = SetPredictor(model).eval()
    graph = torch.export.export(served, (packed,)).module()
    with torch.no_grad():
        out = graph(packed)
        with pytest.raises(ValueError, match="never trained"):
            served(packed)
        eager = served(packed[:1])
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    torch.testing.assert_close(out[:1], eager)


@pytest.mark.parametrize("conditioning", ["true", "false"])
def test_train_basal_stores_the_training_control_mean(st_run, small_store, tmp_path, conditioning):
    """model.basal=train: the stage fills control_mean with the mean log1p features of the
    TRAINING controls per cell type (checked against the h5ad, cell by cell), with or without
    cell-type conditioning: the store's two types have different means, and each set is
    re-centred on its own type's (never on the pooled mean)."""
    from latentcell.data_pipelines.stores import open_store
    from latentcell.inference.predict import log1p_normalize

    config = st_config(small_store, tmp_path / "basal", st_run.split, "model.basal=train",
                       f"model.cell_type_conditioning={conditioning}")  # fmt: skip
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
    means = model.control_mean.numpy()
    assert np.abs(means[0] - means[1]).max() > 0.5  # two types, different means
    assert (model.cell_type is None) == (conditioning == "false") and model.uses_cell_type
    # the untrained model: each type's controls keep their spread around their OWN type's mean
    rows = [np.flatnonzero((pert == control) & (ctype == t))[:16] for t in (0, 1)]
    sets = torch.from_numpy(np.stack([x[r] for r in rows])).float()
    with torch.no_grad():
        out = model.eval().predict(sets, torch.tensor([1, 1]), cell_type=torch.tensor([0, 1]))
    recentred = sets - sets.mean(1, keepdim=True) + model.control_mean[:, None]
    torch.testing.assert_close(out, torch.relu(recentred))


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


def _cell_type_names(store) -> list[str]:
    from latentcell.data_pipelines.stores import open_store

    meta = open_store(store).meta
    return list(meta.categories[meta.roles["cell_type"]])


@pytest.fixture(scope="module")
def held_out_type_run(small_store, tmp_path_factory):
    """A run whose split holds out a whole cell type (controls included) for validation,
    trained with the unknown cell type (cell_type_dropout) and basal=train."""
    root = tmp_path_factory.mktemp("held_out_type")
    held = _cell_type_names(small_store)[1]
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.0\n"
                     f"test_fraction = 0.2\n[split.cell_types]\nval = [{held!r}]\n")  # fmt: skip
    config = st_config(small_store, root / "st", split, "train.max_steps=4",
                       "train.eval_every=4", "train.eval_batches=1", "model.basal=train",
                       "model.cell_type_dropout=0.3")  # fmt: skip
    result = fit(STStage(config), config)
    _reset_accelerate()
    return SimpleNamespace(dir=root / "st", split=split, held=held, result=result,
                           kept=_cell_type_names(small_store)[0])  # fmt: skip


def test_a_held_out_cell_type_is_refused_or_predicted_through_the_unknown_cell_type(
    held_out_type_run, small_store
):
    """The card records the cell types that had training sets; predict refuses the held-out
    one by default (its row and its basal mean were never trained) and, asked explicitly,
    predicts it through the unknown cell type, never reading its row or mean, and says so
    in the file. Validation on it went through the same route (a finite loss)."""
    run = held_out_type_run
    assert np.isfinite(run.result.val_metrics["val/loss"])
    default = STPredictor(run.dir)
    assert default.card["trained_cell_types"] == [run.kept]
    pert = next(p for p in default.labels if p != "non-targeting")
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (20, len(default.genes)))).astype(np.float32)
    assert default.predict(x, pert, run.kept).shape == x.shape
    with pytest.raises(
        DataValidationError, match="row for it was never trained.*--unseen-cell-type unknown"
    ):
        default.predict(x, pert, run.held)
    with pytest.raises(DataValidationError, match="not a cell type of the run"):
        default.predict(x, pert, "neuron")

    unknown = STPredictor(run.dir, unseen_cell_type="unknown")
    routed = unknown.predict(x, pert, run.held)
    assert unknown.routes(pert, run.held) == {"cell_type": "unknown"}
    assert unknown.routes(pert, run.kept) == {}
    np.testing.assert_array_equal(unknown.predict(x, pert, "neuron"), routed)  # no per-type input
    m = unknown.model
    held_code = default.cell_types.index(run.held)
    assert torch.isnan(m.control_mean[held_code]).all()  # no training control of it
    with torch.no_grad():
        m.cell_type.weight[held_code].normal_(0, 10)  # neither its row ...
        m.control_mean[held_code] = 50.0  # ... nor a mean for it is read
        np.testing.assert_array_equal(unknown.predict(x, pert, run.held), routed)
        own = m.predict(torch.from_numpy(x[:16])[None], torch.tensor([default.labels.index(pert)]),
                        cell_type=torch.tensor([0]), unknown=torch.tensor([True]))[0]  # fmt: skip
    np.testing.assert_allclose(routed[:16], own.numpy(), atol=1e-6)  # (sets of 16 cells)

    cells = ad.read_h5ad(small_store.parent / "cells.h5ad")
    request = PopulationRequest((pert,), cells_per_perturbation=10)
    pred = predict_population(unknown, cells, request, "cells.h5ad")
    assert pred.uns["latentcell"]["fallbacks"] == {"cell_type": {run.held: "unknown"}}
    with pytest.raises(DataValidationError, match=f"cell type '{run.held}'"):
        predict_population(default, cells, request, "cells.h5ad")


def test_validation_on_a_held_out_cell_type_needs_the_unknown_cell_type(
    held_out_type_run, small_store, tmp_path
):
    """Without cell_type_dropout, validation would meet the held-out type's random row: the
    stage refuses at the start, naming the key that fixes it."""
    config = st_config(small_store, tmp_path / "no_unknown", held_out_type_run.split)
    stage = STStage(config)
    stage.prepare_data(True)
    with pytest.raises(DataValidationError, match="model.cell_type_dropout.*validation holds"):
        stage.build_model()
    with pytest.raises(ValueError, match="cell_type_conditioning=true"):
        st_config(small_store, tmp_path / "x", held_out_type_run.split,
                  "model.cell_type_conditioning=false", "model.cell_type_dropout=0.2")  # fmt: skip


@pytest.fixture(scope="module")
def implicit_type_run(tmp_path_factory):
    """A store built from an h5ad WITHOUT a cell-type column (its cells: IMPLICIT_LABEL), as
    the README's Papalexi recipe builds one, and a tiny run on it."""
    from tests.synthetic_stores import store_without_cell_type

    root = tmp_path_factory.mktemp("implicit_type")
    cells, store = store_without_cell_type(root)
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.0\n"
                     "test_fraction = 0.2\n")  # fmt: skip
    config = st_config(store, root / "st", split, "train.max_steps=2",
                       "train.eval_every=0", "model.basal=train")  # fmt: skip
    fit(STStage(config), config)
    _reset_accelerate()
    return SimpleNamespace(dir=root / "st", cells=cells)


def test_controls_without_the_cell_type_column(implicit_type_run, st_run, small_store):
    """A run whose store had no cell-type column takes controls without one, as the build
    read its input (IMPLICIT_LABEL); a run with real cell types names the missing column."""
    from latentcell.data_pipelines.schemas import IMPLICIT_LABEL

    predictor = STPredictor(implicit_type_run.dir)
    assert predictor.cell_types == [IMPLICIT_LABEL]
    cells = implicit_type_run.cells
    perts = tuple(p for p in predictor.labels if p != "non-targeting")[:2]
    pred = predict_population(predictor, cells, PopulationRequest(perts, 10), "cells.h5ad")
    n_ctrl = int((cells.obs["target_gene"] == "non-targeting").sum())
    assert pred.n_obs == n_ctrl + 2 * 10 and "cell_type" not in pred.obs
    assert "fallbacks" not in pred.uns["latentcell"]

    typed = ad.read_h5ad(small_store.parent / "cells.h5ad")
    del typed.obs["cell_type"]
    with pytest.raises(
        DataValidationError,
        match="cell_type: the controls have no cell-type column.*--cell-type-col",
    ):
        predict_population(STPredictor(st_run.dir), typed, PopulationRequest(perts[:1], 5), "c")
