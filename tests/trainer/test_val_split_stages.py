"""``data.val_fraction`` on the small chunky store (1,090 cells in 1,000-cell chunks), through
the real loop: ``train vae`` and ``train dit`` split it by cells (``split_by=auto``), stratified
by the store's roles, validate on the same cells and say so in one line and in the model
card; a DiT condition that is no role joins the strata (and the VAE's other cells are
warned about); an explicit ``split_by=units`` that loses cell types is one error line; a run
on a cell split resumes bitwise."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.cell_split import stratified_cell_split
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main
from latentcell.trainer.config import load_config
from latentcell.trainer.dit_stage import DiTRunConfig, DiTStage
from latentcell.trainer.loop import fit
from latentcell.trainer.vae_stage import VAERunConfig, VAEStage
from tests.synthetic_stores import chunky_sorted_store

QUIET = ("train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false",
         "tracking.log_model=false")  # fmt: skip
ROLES = ["batch", "cell_type", "target_gene"]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _fit(stage_cls, config_cls, overrides: list[str], resume: str | None = None):
    config = load_config(config_cls, None, [*QUIET, *overrides])
    try:
        return fit(stage_cls(config), config, resume=resume)
    finally:
        _reset_accelerate()


def vae_overrides(store, run) -> list[str]:
    return [f"data.path={store}", f"run.dir={run}", "data.batch_size=64", "model.n_latent=4",
            "model.n_hidden=16", "train.max_steps=6", "train.eval_every=3"]  # fmt: skip


def dit_overrides(store, run, vae) -> list[str]:
    return [f"data.path={store}", f"run.dir={run}", f"vae.run={vae}", "data.batch_size=64",
            "model.hidden=16", "model.depth=1", "model.heads=2", "model.patch_size=2",
            "train.max_steps=4", "train.eval_every=2", "train.ema=false"]  # fmt: skip


def _rows(loader) -> np.ndarray:
    return np.sort(np.concatenate([b["row"][~b["is_pad"]].numpy() for b in loader]))


def _val_history(run_dir, key: str) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_split_stages")
    store = chunky_sorted_store(root)
    _fit(VAEStage, VAERunConfig, vae_overrides(store, root / "vae"))
    _fit(DiTStage, DiTRunConfig, dit_overrides(store, root / "dit", root / "vae"))
    expected = stratified_cell_split(open_store(store), ROLES, 0.05, seed=0)
    return SimpleNamespace(root=root, store=store, train=expected[0], val=expected[1])


def test_vae_validates_on_stratified_cells_and_says_so(runs, capsys):
    config = load_config(VAERunConfig, None, vae_overrides(runs.store, runs.root / "vae"))
    stage = VAEStage(config)
    stage.prepare_data(True)
    assert capsys.readouterr().err.splitlines() == [
        "validation split: by cells, stratified by batch, cell_type, target_gene "
        "(split_by=auto: the store has 2 read units, fewer than 100): "
        f"{len(runs.train):,} training / {len(runs.val):,} validation cells"
    ]
    assert np.array_equal(_rows(stage.train_loader(0, 1)), runs.train)
    assert np.array_equal(_rows(stage.val_loader(0, 1)), runs.val)
    assert len(_val_history(runs.root / "vae", "val/elbo")) == 2
    card = json.loads((runs.root / "vae" / "final" / "model_config.json").read_text())
    record = card["validation_split"]
    assert record["by"] == "cells" and record["stratify"] == ROLES
    assert record["n_val_cells"] == len(runs.val) and "2 read units" in record["reason"]


def test_dit_validates_on_the_vaes_cells(runs, capsys):
    config = load_config(DiTRunConfig, None,
                         dit_overrides(runs.store, runs.root / "dit", runs.root / "vae"))  # fmt: skip
    stage = DiTStage(config)
    assert np.array_equal(_rows(stage.train_loader(0, 1)), runs.train)
    assert np.array_equal(_rows(stage.val_loader(0, 1)), runs.val)
    assert len(_val_history(runs.root / "dit", "val/loss")) == 2
    stats = json.loads((runs.root / "dit" / "latent_stats.json").read_text())
    assert stats["n_cells"] == len(runs.train)  # statistics of the training cells only
    stage.prepare_data(True)  # the cells the VAE held out: no warning
    assert "held out other cells" not in capsys.readouterr().err
    card = json.loads((runs.root / "dit" / "final" / "model_config.json").read_text())
    vae_card = json.loads((runs.root / "vae" / "final" / "model_config.json").read_text())
    assert card["validation_split"]["train_sha256"] == vae_card["validation_split"]["train_sha256"]


def test_dit_condition_that_is_no_role_joins_the_strata(runs, tmp_path, capsys):
    config = load_config(DiTRunConfig, None, [
        *dit_overrides(runs.store, tmp_path / "dit", runs.root / "vae"),
        'model.conditions=["guide_id"]',
    ])  # fmt: skip
    stage = DiTStage(config)
    stage.prepare_data(True)
    err = capsys.readouterr().err
    assert "stratified by batch, cell_type, guide_id, target_gene" in err
    assert "warning: the VAE" in err and "held out other cells" in err
    assert "data.stratify=['batch', 'cell_type', 'guide_id', 'target_gene']" in err
    train = _rows(stage.train_loader(0, 1))
    guides = open_store(runs.store).read_rows(0, 1090).codes["guide_id"]
    assert set(np.unique(guides[train])) == set(np.unique(guides))  # every guide trains


def test_explicit_unit_split_losing_cell_types_is_one_line(runs, tmp_path, capsys):
    for stage in ("vae", "dit"):
        run = tmp_path / stage
        items = (vae_overrides(runs.store, run) if stage == "vae"
                 else dit_overrides(runs.store, run, runs.root / "vae"))  # fmt: skip
        argv = ["train", stage]
        for item in [*items, *QUIET, "data.split_by=units"]:
            argv += ["--set", item]
        try:
            code = main(argv)
        finally:
            _reset_accelerate()
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {runs.store}: data.split_by: the split by read units")
        assert "no training cell of cell_type [" in err[0]
        assert "Fix: set data.split_by=cells" in err[0]
        assert not (run / "latents").exists() and not (run / "val_split.npz").exists()


def test_unknown_stratify_column_is_a_data_error(runs, tmp_path):
    config = load_config(VAERunConfig, None, [
        *vae_overrides(runs.store, tmp_path / "vae"), 'data.stratify=["tissue"]'])  # fmt: skip
    with pytest.raises(DataValidationError, match="data.stratify: 'tissue'"):
        VAEStage(config).prepare_data(True)


def test_vae_on_a_cell_split_resumes_bitwise(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    overrides = [*vae_overrides(runs.store, tmp_path / "full"), "train.max_steps=10",
                 "train.eval_every=0", "train.checkpoint_every=4", "train.keep_last=5"]  # fmt: skip
    full = tmp_path / "full"
    _fit(VAEStage, VAERunConfig, overrides)
    resumed = tmp_path / "resumed"  # as if killed after the step-4 checkpoint
    shutil.copytree(full, resumed)
    for name in ("final", "checkpoints/step_8", "checkpoints/step_10"):
        shutil.rmtree(resumed / name)
    _fit(VAEStage, VAERunConfig, [*overrides, f"run.dir={resumed}"], resume="auto")
    assert f"resumed from {resumed / 'checkpoints' / 'step_4'} at step 4" in capsys.readouterr().err
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
