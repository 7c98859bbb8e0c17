"""`latentcell train st-pretrain` on a real observational (scBaseCount-schema) Zarr store:
the loss falls through the real loop, the masked-gene MSE beats the corrupted input's,
validation holds out whole groups, the card rebuilds the model, and `latentcell train st
--set init.run=...` on a VCC store with the same genes starts from the shared tensors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main
from latentcell.trainer.config import ConfigError, load_config
from latentcell.trainer.loop import evaluate
from latentcell.trainer.st_pretrain_stage import (
    MODEL_CLASS,
    STPretrainRunConfig,
    STPretrainStage,
    build_st_pretrain_model,
)
from latentcell.trainer.st_stage import STRunConfig, STStage, load_matching

SHARED = ("cell_encoder.", "segment", "blocks.", "norm.", "head.")
TINY = ["model.hidden=32", "model.depth=1", "model.heads=2", "train.checkpoint_every=0",
        "train.progress=false", "tracking.enabled=false", "tracking.log_model=false"]  # fmt: skip


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def pretrain_overrides(store, run_dir) -> list[str]:
    return [
        f"data.path={store}", f"run.dir={run_dir}", "data.set_size=16", "data.sets_per_batch=4",
        "data.val_fraction=0.15", "train.max_steps=80", "train.eval_every=40",
        "tracking.log_every=10", "optim.lr=3e-3", "optim.warmup_steps=5", *TINY,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def obs_store(tmp_path_factory):
    """1,200 synthetic scBaseCount cells x 200 genes: 3 cell types x 3 SRX samples."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("obs_store")
    config = SynthConfig(
        schema="scbasecount", n_cells=1200, n_genes=200, n_cell_types=3, n_batches=3, seed=0
    )
    synthesize(config, root / "obs.h5ad")
    store = root / "obs.zarr"
    build_store([root / "obs.h5ad"], store, format="zarr", schema="scbasecount", chunk_cells=100)
    return store


@pytest.fixture(scope="module")
def pretrain_run(obs_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("st_pretrain") / "pre"
    assert main(["train", "st-pretrain", *_sets(*pretrain_overrides(obs_store, run_dir))]) == 0
    _reset_accelerate()
    config = load_config(STPretrainRunConfig, None, pretrain_overrides(obs_store, run_dir))
    return SimpleNamespace(store=obs_store, dir=run_dir, config=config)


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_masked_genes_beat_the_corrupted_input(pretrain_run):
    log = _log(pretrain_run.dir)
    train = [r["train/loss"] for r in log if "train/loss" in r]
    assert len(train) == 8 and train[-1] < 0.8 * train[0]
    final = [r for r in log if "val/loss" in r][-1]
    assert final["step"] == 80
    # the untrained model returns the corrupted input (masked genes = 0): the trained one
    # must fill them in far better
    assert final["val/masked_mse"] < 0.7 * final["val/masked_mse_input"]

    # the saved weights, rebuilt from the card alone, score the same on the held-out groups
    card = json.loads((pretrain_run.dir / "final" / "model_config.json").read_text())
    assert card["class"] == MODEL_CLASS
    model = build_st_pretrain_model(card)
    model.load_state_dict(load_file(str(pretrain_run.dir / "final" / "model.safetensors")))
    stage = STPretrainStage(pretrain_run.config)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    again = evaluate(model, stage.val_loader(0, 1), accelerator, 0, 0)
    assert again["masked_mse"] == pytest.approx(final["val/masked_mse"], rel=1e-5)
    assert card["genes"] == [str(g) for g in open_store(pretrain_run.store).meta.var.index]
    assert card["config"]["perturbation_labels"] == ["non-targeting"]
    module, example = stage.serving_module(model)
    assert module(torch.from_numpy(example)).shape == (2, 8, 200)


def test_validation_holds_out_whole_groups(pretrain_run):
    split = json.loads((pretrain_run.dir / "split.json").read_text())
    assert split["held_out"] == "groups" and split["n_val_groups"] >= 1
    assert 0 < split["n_val_cells"] <= 0.15 * 1200
    val_keys = {tuple(g["codes"]) for g in split["val_groups"]}
    stage = STPretrainStage(pretrain_run.config)
    reader = open_store(pretrain_run.store)
    index = reader.group_index()
    key_of_row = np.empty(reader.meta.n_cells, dtype=object)
    for row in index.itertuples():
        key_of_row[row.start : row.stop] = [(row.cell_type, row.perturbation, row.batch)]

    def keys(loader) -> set:
        return {key_of_row[r] for b in loader for r in b["cells"]["row"].reshape(-1).tolist()}

    assert keys(stage.val_loader(0, 1)) == val_keys
    train_keys = keys(stage.train_loader(0, 1))
    assert not train_keys & val_keys and len(train_keys) + len(val_keys) == 9


def test_fine_tuning_on_a_vcc_store_loads_the_shared_tensors(pretrain_run, small_store, tmp_path):
    genes = open_store(small_store).meta.var.index
    assert list(genes) == list(open_store(pretrain_run.store).meta.var.index)  # same vocabulary
    overrides = [
        f"data.path={small_store}", f"run.dir={tmp_path / 'ft'}", f"init.run={pretrain_run.dir}",
        "data.set_size=16", "data.sets_per_batch=4", "train.max_steps=3", "train.eval_every=0",
        "train.eval_batches=1", "model.cell_type_conditioning=true", *TINY,
    ]  # fmt: skip
    stage = STStage(load_config(STRunConfig, None, overrides))
    stage.prepare_data(True)
    torch.manual_seed(0)
    model = stage.build_model()
    pretrained = load_file(str(pretrain_run.dir / "final" / "model.safetensors"))
    own = model.state_dict()
    shared = [k for k in own if k.startswith(SHARED)]
    assert any(k.startswith("blocks.") for k in shared) and "head.weight" in shared
    for name in shared:
        torch.testing.assert_close(own[name], pretrained[name], rtol=0, atol=0)
    # the perturbation encoder and the cell-type table start fresh
    assert own["perturbation.table.weight"].shape != pretrained["perturbation.table.weight"].shape
    assert "cell_type.weight" in own and "cell_type.weight" not in pretrained
    counts = load_matching(model, pretrain_run.dir)
    assert counts == {"loaded": len(shared), "fresh": len(own) - len(shared)}

    # and the command a user runs
    assert main(["train", "st", *_sets(*overrides)]) == 0
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()


def test_both_stages_read_the_model_shape_with_the_same_keys_and_checks():
    """``model.*`` shape keys are ``STShape`` in both stages: same names, same early checks."""
    shape = ["model.hidden=48", "model.depth=3", "model.heads=6", "model.conditioning=cross"]
    pre = load_config(STPretrainRunConfig, None, shape)
    fine = load_config(STRunConfig, None, shape)
    assert pre.model.shape_kwargs() == fine.model.shape_kwargs()
    for cls in (STPretrainRunConfig, STRunConfig):
        with pytest.raises(ConfigError, match="divisible"):
            load_config(cls, None, ["model.hidden=30", "model.heads=4"])
