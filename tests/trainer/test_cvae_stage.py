"""``latentcell train cvae`` through the real CLI and loop on a tiny perturbation store with a
split file: the model card holds everything the predictor and the exporter read (and the
labels the split kept out of training are not among the trained ones), the conditions come
from the store's roles through the loader, and a store without perturbations is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.perturbation_splits import read_split_rows
from latentcell.data_pipelines.row_subset import rows_digest
from latentcell.data_pipelines.stores import open_store
from latentcell.trainer.config import load_config
from latentcell.trainer.cvae_stage import CVAERunConfig, CVAEStage
from tests.cvae_runs import cvae_store, train_cvae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvae_stage")
    cells, store, split = cvae_store(root)
    run = root / "cvae"
    assert train_cvae(f"data.path={store}", f"split.file={split}", f"run.dir={run}",
                      "train.seed=3", "train.max_steps=5", "data.batch_size=64",
                      "model.n_hidden=16") == 0  # fmt: skip
    return root, store, split, run


def test_the_card_holds_what_prediction_and_export_need(tiny):
    _, store, split, run = tiny
    card = json.loads((run / "final" / "model_config.json").read_text())
    meta = open_store(store).meta
    labels = meta.categories[meta.roles["perturbation"]]
    assert card["class"] == "latentcell.models.cvae.ConditionalVAE"
    config = card["config"]
    assert config["covariate_keys"] == ["perturbation", "cell_type"]
    assert config["n_covariate_categories"] == [len(labels), 2]
    assert config["encode_covariates"] and config["n_batches"] == 0  # batch: off by default
    assert config["likelihood"] == "nb" and card["conditions"] == ["perturbation", "cell_type"]
    assert card["genes"] == [str(g) for g in meta.var.index]
    assert card["categories"] == {r: meta.categories[meta.roles[r]]
                                  for r in ("perturbation", "cell_type", "batch")}  # fmt: skip
    assert card["roles"]["perturbation"] == meta.roles["perturbation"]
    assert card["control_label"] == meta.control_label == "non-targeting"
    assert card["store"] == str(store.absolute())
    held = json.loads((run / "split.json").read_text())["held_out"]["test_perturbations"]
    assert len(held) == 1 and held[0] in labels
    assert card["trained_perturbations"] == [x for x in labels if x not in held]
    assert card["trained_cell_types"] == meta.categories[meta.roles["cell_type"]]
    assert card["default_batch"] in meta.categories[meta.roles["batch"]]
    train_rows = read_split_rows(run / "split.npz")["train"]
    assert card["split"]["train_rows_sha256"] == rows_digest(train_rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5


def test_conditions_come_from_the_roles_through_the_loader(tiny):
    root, store, split, _ = tiny
    config = load_config(CVAERunConfig, None, [
        f"data.path={store}", f"split.file={split}", f"run.dir={root / 'batch'}",
        "model.batch_conditioning=true", "model.cell_type_conditioning=false", "model.n_hidden=16",
        "data.batch_size=32",
    ])  # fmt: skip
    stage = CVAEStage(config)
    model_config = stage.model_config()
    assert model_config.covariate_keys == ("perturbation",)
    assert model_config.batch_key == "batch" and model_config.n_batches == 2
    stage.prepare_data(True)
    batch = next(iter(stage.train_loader(0, 1)))
    rows = read_split_rows(root / "batch" / "split.npz")["train"]
    assert set(batch["row"].tolist()) <= set(rows.tolist())
    model = stage.build_model()
    out = model(batch)
    assert torch.isfinite(out.loss)
    # the codes the loader delivers are the store's: perturbation codes of the batch's rows
    meta = open_store(store).meta
    block = open_store(store).read_rows(0, meta.n_cells)
    column = meta.roles["perturbation"]
    expected = np.asarray(block.codes[column])[batch["row"].numpy()]
    assert np.array_equal(batch["obs"]["perturbation"].numpy(), expected)


def test_a_store_without_perturbations_is_one_line(tmp_path, capsys):
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    config = SynthConfig(schema="scbasecount", n_cells=200, n_genes=20, n_perturbations=0, seed=0)
    synthesize(config, tmp_path / "atlas.h5ad")
    build_store([tmp_path / "atlas.h5ad"], tmp_path / "atlas.zarr", chunk_cells=100)
    rc = train_cvae(f"data.path={tmp_path / 'atlas.zarr'}", f"run.dir={tmp_path / 'run'}",
                    "train.max_steps=2")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert "roles.perturbation" in err and "Fix:" in err
    assert not (tmp_path / "run" / "final").exists()
