"""No file of a run directory can make ``latentcell train --resume auto``, ``latentcell export``
or ``latentcell predict`` run code.

A payload is an object whose ``__reduce__`` writes a marker file, pickled plainly or with
``torch.save``. It replaces, in turn, each file of a real checkpoint of a tiny ST run (as
written, and with the checkpoint's manifest rewritten to match, as someone who can write the
directory would), is planted as the pickles Accelerate's ``save_state`` used to write, and
replaces each run-level file export and predict read. Every command is run through
``latentcell.launch.cli.main`` in-process; each must either work (the file is not read) or
fail with exactly one ``error:`` line, and the marker must never appear.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch

from latentcell.launch.cli import main
from tests.trainer.test_safe_state import Payload

CHECKPOINT_FILES = ("ema.safetensors", "loader_rank0.json", "model.safetensors",
                    "optimizer.safetensors", "rng_rank0.safetensors", "trainer_state.json")  # fmt: skip
ACCELERATE_PICKLES = ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl",
                      "scheduler.bin")  # fmt: skip
RUN_FILES = ("final/ema.safetensors", "final/model.safetensors", "final/model_config.json",
             "summary.json", "split.npz", "split.json", "config.toml")  # fmt: skip
FORMS = ("pickle", "torch.save")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_argv(store, split, run) -> list[str]:
    argv = ["train", "st"]
    for item in (
        f"data.path={store}", f"split.file={split}", f"run.dir={run}", "data.set_size=16",
        "data.sets_per_batch=4", "model.hidden=32", "model.depth=1", "model.heads=2",
        "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=2", "train.ema=true",
        "train.progress=false", "tracking.enabled=false",
    ):  # fmt: skip
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    import anndata as ad

    from latentcell.trainer.st_stage import split_source_rows

    root = tmp_path_factory.mktemp("payloads")
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n")
    run = root / "st"
    try:
        assert main(_train_argv(small_store, split, run)) == 0
    finally:
        _reset_accelerate()
    source = ad.read_h5ad(small_store.parent / "cells.h5ad")
    controls = root / "controls.h5ad"
    source[split_source_rows(run, small_store)["test"]].write_h5ad(controls)
    return SimpleNamespace(store=small_store, split=split, run=run, controls=controls)


def _plant(path, marker, form) -> None:
    if form == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state": Payload(marker)}, path)


def _rehash(step_dir, name) -> None:
    state = json.loads((step_dir / "trainer_state.json").read_text())
    data = (step_dir / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))


def _run(command, t, run, tmp_path, capsys) -> tuple[int, list[str]]:
    """(exit code, the error: lines) of one command on the run copy ``run``."""
    capsys.readouterr()
    if command == "resume":
        argv = [*_train_argv(t.store, t.split, run), "--resume", "auto"]
    elif command == "export":
        argv = ["export", "--run", str(run), "--out", str(tmp_path / "bundle"), "--no-mlflow"]
    else:
        argv = ["predict", "--run", str(run), "--controls", str(t.controls), "--perturbations",
                "all", "--cells-per-perturbation", "4", "--out", str(tmp_path / "pred.h5ad")]  # fmt: skip
    try:
        code = main(argv)
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _copy(t, tmp_path):
    run = tmp_path / "st"
    shutil.copytree(t.run, run)
    return run, run / "checkpoints" / "step_4"


@pytest.mark.parametrize("manifest", ["as planted", "rewritten"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_refuses_a_payload_in_any_checkpoint_file(trained, tmp_path, capsys, name, form,
                                                         manifest):  # fmt: skip
    run, step_dir = _copy(trained, tmp_path)
    marker = tmp_path / "MARKER"
    _plant(step_dir / name, marker, form)
    if manifest == "rewritten" and name != "trainer_state.json":
        _rehash(step_dir, name)
    code, errors = _run("resume", trained, run, tmp_path, capsys)
    assert not marker.exists()
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {step_dir / name}: ")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ACCELERATE_PICKLES)
def test_resume_never_opens_accelerate_pickles_planted_beside_it(trained, tmp_path, capsys, name,
                                                                  form):  # fmt: skip
    run, step_dir = _copy(trained, tmp_path)
    marker = tmp_path / "MARKER"
    _plant(step_dir / name, marker, form)
    code, errors = _run("resume", trained, run, tmp_path, capsys)
    assert not marker.exists()
    assert code == 0 and errors == []


@pytest.mark.parametrize("command", ["export", "predict"])
@pytest.mark.parametrize("form", FORMS)
def test_export_and_predict_never_read_checkpoints(trained, tmp_path, capsys, command, form):
    """Every checkpoint file of both checkpoints replaced, the old pickles planted too."""
    run, _ = _copy(trained, tmp_path)
    marker = tmp_path / "MARKER"
    for step_dir in (run / "checkpoints").iterdir():
        for name in (*CHECKPOINT_FILES, *ACCELERATE_PICKLES):
            _plant(step_dir / name, marker, form)
    code, errors = _run(command, trained, run, tmp_path, capsys)
    assert not marker.exists()
    assert code == 0 and errors == []


# An export that does not read the file runs a whole ONNX export (~3 s): its torch.save
# form is left to the slow run.
RUN_CASES = [
    pytest.param(name, form, command,
                 marks=[pytest.mark.slow] if (command, form) == ("export", "torch.save") else [])
    for name in RUN_FILES for form in FORMS for command in ("resume", "export", "predict")
]  # fmt: skip


@pytest.mark.parametrize(("name", "form", "command"), RUN_CASES)
def test_run_files_with_a_payload_work_or_fail_in_one_line(trained, tmp_path, capsys, name,
                                                          form, command):  # fmt: skip
    run, _ = _copy(trained, tmp_path)
    marker = tmp_path / "MARKER"
    _plant(run / name, marker, form)
    code, errors = _run(command, trained, run, tmp_path, capsys)
    assert not marker.exists()
    assert (code == 0 and errors == []) or (code in (1, 2) and len(errors) == 1), (code, errors)
