"""One split TOML for every stage, on the real small store through the real loop:
``latentcell data split``, ``train st``, ``train vae`` and ``train dit`` (``split.file``) assign
the same rows; the VAE's and the DiT's loaders yield train rows only (all of them) and
validate on the val rows; the stream's layout carries the rows' digest (exact resume); a
bad split file or a contradicting ``data.val_path`` is one clear error."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.perturbation_splits import read_split_rows
from latentcell.data_pipelines.row_subset import rows_digest
from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main
from latentcell.trainer.config import ConfigError, load_config
from latentcell.trainer.dit_stage import DiTRunConfig, DiTStage
from latentcell.trainer.loop import fit
from latentcell.trainer.st_stage import STRunConfig, STStage
from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

QUIET = ("train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
         "tracking.enabled=false", "tracking.log_model=false")  # fmt: skip


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _fit(stage_cls, config_cls, overrides: list[str]):
    config = load_config(config_cls, None, [*QUIET, *overrides])
    try:
        return fit(stage_cls(config), config)
    finally:
        _reset_accelerate()


def vae_overrides(store, run, split) -> list[str]:
    return [f"data.path={store}", f"run.dir={run}", f"split.file={split}", "data.batch_size=64",
            "model.n_latent=4", "model.n_hidden=16", "train.max_steps=3"]  # fmt: skip


def dit_overrides(store, run, split, vae) -> list[str]:
    return [f"data.path={store}", f"run.dir={run}", f"split.file={split}", f"vae.run={vae}",
            "data.batch_size=64", "model.hidden=16", "model.depth=1", "model.heads=2",
            "train.max_steps=2", "train.ema=false"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("split_file_stages")
    meta = open_store(small_store).meta
    types = meta.categories[meta.roles["cell_type"]]
    perts = [p for p in meta.categories[meta.roles["perturbation"]] if p != meta.control_label]
    split = root / "split.toml"  # iid cells plus a held-out (cell type, perturbation) pair
    split.write_text(
        "[split]\nseed = 7\n[split.cells]\nval_fraction = 0.15\ntest_fraction = 0.2\n"
        f'[[split.perturbations]]\ntest = ["{perts[1]}"]\ncell_types = ["{types[0]}"]\n'
    )
    assert main(["data", "split", "--store", str(small_store), "--split", str(split),
                 "--out", str(root / "parts")]) == 0  # fmt: skip
    _fit(STStage, STRunConfig, [
        f"data.path={small_store}", f"run.dir={root / 'st'}", f"split.file={split}",
        "data.set_size=8", "data.sets_per_batch=2", "model.hidden=16", "model.depth=1",
        "model.heads=2", "train.max_steps=2",
    ])  # fmt: skip
    _fit(VAEStage, VAERunConfig, vae_overrides(small_store, root / "vae", split))
    _fit(DiTStage, DiTRunConfig, dit_overrides(small_store, root / "dit", split, root / "vae"))
    return SimpleNamespace(root=root, store=small_store, split=split)


def _loader_rows(loader) -> tuple[np.ndarray, np.ndarray]:
    """(rows of real cells, rows of pad cells) one epoch of ``loader`` yields."""
    real, pad = [], []
    for batch in loader:
        rows, is_pad = batch["row"].numpy(), batch["is_pad"].numpy()
        real.append(rows[~is_pad])
        pad.append(rows[is_pad])
    return np.concatenate(real), np.concatenate(pad)


def test_every_stage_assigns_the_same_rows(runs):
    reference = read_split_rows(runs.root / "st" / "split.npz")
    assert min(len(reference[k]) for k in ("train", "val", "test")) > 0
    for where in ("parts", "vae", "dit"):
        rows = read_split_rows(runs.root / where / "split.npz")
        for part in ("train", "val", "test"):
            assert np.array_equal(rows[part], reference[part]), (where, part)
    summaries = {w: json.loads((runs.root / w / "split.json").read_text())
                 for w in ("parts", "st", "vae", "dit")}  # fmt: skip
    assert all(s["splits"] == summaries["st"]["splits"] for s in summaries.values())


def test_vae_trains_on_train_rows_and_validates_on_val_rows(runs):
    rows = read_split_rows(runs.root / "st" / "split.npz")
    config = load_config(VAERunConfig, None, vae_overrides(runs.store, runs.root / "vae",
                                                           runs.split))  # fmt: skip
    stage = VAEStage(config)
    train = stage.train_loader(0, 1)
    real, pad = _loader_rows(train)
    assert np.array_equal(np.sort(real), rows["train"])  # every train row once, no other row
    assert set(pad.tolist()) <= set(rows["train"].tolist())  # pads repeat train rows only
    assert train.state_dict()["layout"]["rows_digest"] == rows_digest(rows["train"])
    val_real, _ = _loader_rows(stage.val_loader(0, 1))
    assert np.array_equal(np.sort(val_real), rows["val"])
    card = json.loads((runs.root / "vae" / "final" / "model_config.json").read_text())
    assert card["split"]["train_rows_sha256"] == rows_digest(rows["train"])


def test_dit_streams_the_same_rows_of_its_latents(runs, capsys):
    rows = read_split_rows(runs.root / "st" / "split.npz")
    config = load_config(DiTRunConfig, None, dit_overrides(
        runs.store, runs.root / "dit", runs.split, runs.root / "vae"))  # fmt: skip
    stage = DiTStage(config)
    real, pad = _loader_rows(stage.train_loader(0, 1))
    assert np.array_equal(np.sort(real), rows["train"])
    assert set(pad.tolist()) <= set(rows["train"].tolist())
    val_real, _ = _loader_rows(stage.val_loader(0, 1))
    assert np.array_equal(np.sort(val_real), rows["val"])
    stats = json.loads((runs.root / "dit" / "latent_stats.json").read_text())
    assert stats["n_cells"] == len(rows["train"])  # statistics of the train rows only
    # the VAE was trained on the same split: the DiT's preparation did not warn
    stage.prepare_data(True)
    assert "was not trained on the train rows" not in capsys.readouterr().err


def test_dit_warns_when_its_vae_saw_other_cells(runs, tmp_path, capsys):
    other = tmp_path / "other.toml"
    other.write_text("[split]\nseed = 1\n[split.cells]\ntest_fraction = 0.3\n")
    config = load_config(DiTRunConfig, None, dit_overrides(
        runs.store, tmp_path / "dit", other, runs.root / "vae"))  # fmt: skip
    DiTStage(config).prepare_data(True)
    assert "was not trained on the train rows" in capsys.readouterr().err


def test_split_file_and_val_path_contradict(runs, tmp_path):
    for config_cls, stage_cls in ((VAERunConfig, VAEStage), (DiTRunConfig, DiTStage)):
        config = load_config(config_cls, None, [
            f"data.path={runs.store}", f"split.file={runs.split}", f"data.val_path={runs.store}",
            f"run.dir={tmp_path / 'x'}",
        ])  # fmt: skip
        with pytest.raises(ConfigError, match="split.file and data.val_path"):
            stage_cls(config)


def test_bad_split_file_is_one_line(runs, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[split]\n[split.cell_types]\ntest = ["no such type"]\n')
    argv = ["train", "vae"]
    for item in vae_overrides(runs.store, tmp_path / "vae", bad) + list(QUIET):
        argv += ["--set", item]
    try:
        code = main(argv)
    finally:
        _reset_accelerate()
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert code == 2 and len(err) == 1
    assert "bad.toml" in err[0] and "split.cell_types.test" in err[0] and "Fix:" in err[0]


def test_vae_with_a_split_resumes_bitwise_and_refuses_another_split(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    def overrides(run, split) -> list[str]:
        return [*vae_overrides(runs.store, run, split), "data.batch_size=128",
                "train.max_steps=10"]  # fmt: skip

    full = tmp_path / "full"
    every = ["train.checkpoint_every=4", "train.keep_last=5"]
    _fit(VAEStage, VAERunConfig, [*overrides(full, runs.split), *every])
    resumed = tmp_path / "resumed"  # as if killed after the step-4 checkpoint
    shutil.copytree(full, resumed)
    for name in ("final", "checkpoints/step_8", "checkpoints/step_10"):
        shutil.rmtree(resumed / name)
    config = load_config(VAERunConfig, None, [*QUIET, *overrides(resumed, runs.split), *every])
    try:
        fit(VAEStage(config), config, resume="auto")
    finally:
        _reset_accelerate()
    assert f"resumed from {resumed / 'checkpoints' / 'step_4'} at step 4" in capsys.readouterr().err
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "other.toml"  # the same numbers of cells per part, other cells
    other.write_text(runs.split.read_text().replace("seed = 7", "seed = 8"))
    moved = tmp_path / "moved"
    shutil.copytree(full, moved)
    shutil.rmtree(moved / "final")
    config = load_config(VAERunConfig, None, [*QUIET, *overrides(moved, other), *every])
    try:
        with pytest.raises(ValueError, match="rows_digest"):
            fit(VAEStage(config), config, resume="auto")
    finally:
        _reset_accelerate()
