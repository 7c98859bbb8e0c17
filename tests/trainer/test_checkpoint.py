"""Checkpoints hold no pickle, resume bitwise, and refuse any file that is corrupt or tampered
with in one line naming it, without running anything from it (toy stage, one process).

A payload is an object whose ``__reduce__`` writes a marker file: if any loader unpickled
it, the marker would exist. Tampered files get a matching manifest entry (what an attacker
who can write the run directory would do), so the readers themselves are what is tested;
plain corruption (truncation, a flipped byte) is caught earlier by the manifest.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.checkpoint import resolve_resume
from latentcell.trainer.config import load_config
from latentcell.trainer.loop import fit
from latentcell.trainer.safe_state import load_tree, save_tree
from tests.trainer.test_safe_state import Payload
from tests.trainer.toy_stage import ToyRunConfig, ToyStage

FILES = {
    "ema.safetensors",
    "loader_rank0.json",
    "model.safetensors",
    "optimizer.safetensors",
    "rng_rank0.safetensors",
    "trainer_state.json",
}


def _config(run_dir, *overrides):
    return load_config(
        ToyRunConfig,
        None,
        [
            f"run.dir={run_dir}", "train.progress=false", "tracking.log_every=5",
            "train.max_steps=20", "train.checkpoint_every=10", "train.ema=true",
            "train.ema_decay=0.9", "train.eval_every=0", "train.grad_accum_steps=2",
            "train.keep_last=3", *overrides,
        ],
    )  # fmt: skip


def _weights(run_dir, name="model"):
    return load_file(str(run_dir / "final" / f"{name}.safetensors"))


def _equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one that crashed 3 steps after its step-10 checkpoint."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("ckpt")
    try:
        full = _config(root / "full")
        fit(ToyStage(full), full)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        crashed = _config(root / "crashed")
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(ToyStage(crashed, crash_after=26), crashed)  # 2 micro-batches per step
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert [p.name for p in (root / "crashed" / "checkpoints").iterdir()] == ["step_10"]
    return root


def _copy(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "crashed", run_dir)
    return run_dir, run_dir / "checkpoints" / "step_10"


def _resume(run_dir, *overrides):
    config = _config(run_dir, *overrides)
    return fit(ToyStage(config), config, resume="auto")


def _rehash(step_dir, name):
    """Make the manifest agree with the file, as someone rewriting the directory would."""
    state = json.loads((step_dir / "trainer_state.json").read_text())
    data = (step_dir / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))


def test_layout_holds_no_pickle(runs):
    step_dir = runs / "full" / "checkpoints" / "step_20"
    assert {p.name for p in step_dir.iterdir()} == FILES
    for path in step_dir.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path.name} looks like a pickle"
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert state["format"] == 2 and set(state["files"]) == FILES - {"trainer_state.json"}
    assert state["accelerate"]["step"] == 40  # Accelerate's micro-step counter


def test_resume_is_bitwise_for_weights_ema_optimizer_and_rng(runs, tmp_path, capsys):
    run_dir, _ = _copy(runs, tmp_path)
    stage_config = _config(run_dir)
    stage = ToyStage(stage_config)
    fit(stage, stage_config, resume="auto")
    assert len(stage.rows_seen) == 20  # resumed at step 10: 10 steps x 2 micro-batches
    err = capsys.readouterr().err
    assert err.count("resumed from") == 1
    assert f"resumed from {run_dir / 'checkpoints' / 'step_10'} at step 10 (epoch 0)" in err
    full = runs / "full"
    for name in ("model", "ema"):
        assert _equal(_weights(full, name), _weights(run_dir, name)), name
    a = full / "checkpoints" / "step_20"
    b = run_dir / "checkpoints" / "step_20"
    opt_a = load_tree(a / "optimizer.safetensors", "")
    opt_b = load_tree(b / "optimizer.safetensors", "")
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for pid, entry in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][pid][k]) for k, v in entry.items())
    rng_a, rng_b = (
        load_tree(a / "rng_rank0.safetensors", ""),
        load_tree(b / "rng_rank0.safetensors", ""),
    )
    assert rng_a["python"] == rng_b["python"] and rng_a["numpy"] == rng_b["numpy"]
    assert torch.equal(rng_a["torch"], rng_b["torch"])
    state_a = json.loads((a / "trainer_state.json").read_text())
    state_b = json.loads((b / "trainer_state.json").read_text())
    assert state_a["accelerate"] == state_b["accelerate"]
    assert state_a["files"] == state_b["files"]  # every checkpoint file is byte-identical


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin",
                                  "random_states_0.pkl", "pytorch_model.bin", "scaler.pt"])  # fmt: skip
def test_files_a_checkpoint_does_not_list_are_never_opened(runs, tmp_path, name):
    run_dir, step_dir = _copy(runs, tmp_path)
    marker = tmp_path / "MARKER"
    (step_dir / name).write_bytes(pickle.dumps(Payload(marker)))
    _resume(run_dir)
    assert not marker.exists()
    assert _equal(_weights(runs / "full"), _weights(run_dir))


def _payload(path, marker, form):
    if form == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"state": Payload(marker)}, path)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", sorted(FILES))
def test_a_payload_in_any_file_fails_in_one_line_and_never_runs(runs, tmp_path, name, form):
    run_dir, step_dir = _copy(runs, tmp_path)
    marker = tmp_path / "MARKER"
    _payload(step_dir / name, marker, form)
    if name != "trainer_state.json":
        _rehash(step_dir, name)
    with pytest.raises(DataValidationError) as err:
        _resume(run_dir)
    line = str(err.value)
    assert line.startswith(str(step_dir / name)) and "Fix: " in line and "\n" not in line
    assert not marker.exists()
    assert not (run_dir / "final").exists()  # never trained on


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-9])


def _ema_wrong_shape(path):
    tensors = load_file(str(path))
    tensors["module.linear.weight"] = torch.zeros(1, 9)
    save_file(tensors, str(path))


def _model_wrong_shape(path):
    tensors = load_file(str(path))
    tensors["linear.bias"] = torch.zeros(2)
    save_file(tensors, str(path))


def _optimizer_wrong_shape(path):
    tree = load_tree(path, "")
    tree["state"][0]["exp_avg"] = torch.zeros(3)
    save_tree(tree, path)


def _rng_malformed(path):
    tree = load_tree(path, "")
    tree["torch"] = torch.zeros(3)
    save_tree(tree, path)


@pytest.mark.parametrize(
    ("name", "tamper", "rehash", "problem"),
    [
        ("model.safetensors", _truncate, False, "truncated or changed"),
        ("optimizer.safetensors", _flip_byte, False, "sha256 differs"),
        ("rng_rank0.safetensors", lambda p: p.unlink(), False, "missing"),
        ("model.safetensors", _truncate, True, "not a safetensors file"),
        ("model.safetensors", _model_wrong_shape, True, "size mismatch"),
        ("ema.safetensors", _ema_wrong_shape, True, "size mismatch"),
        ("optimizer.safetensors", _optimizer_wrong_shape, True, "shape (3,), expected (1, 7)"),
        ("rng_rank0.safetensors", _rng_malformed, True, "not a generator state"),
        ("loader_rank0.json", lambda p: p.write_text("[1, 2"), True, "not JSON"),
    ],
)
def test_corrupt_files_fail_in_one_line_naming_them(runs, tmp_path, name, tamper, rehash, problem):
    run_dir, step_dir = _copy(runs, tmp_path)
    tamper(step_dir / name)
    if rehash:
        _rehash(step_dir, name)
    with pytest.raises(DataValidationError, match="Fix: ") as err:
        _resume(run_dir)
    assert str(err.value).startswith(str(step_dir / name)), str(err.value)
    assert problem in str(err.value)
    assert not (run_dir / "final").exists()


def _edit_state(step_dir, edit):
    path = step_dir / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("edit", "overrides", "problem"),
    [
        (
            lambda s: s["accelerate"]["scheduler"].update(lr_lambdas=[{"x": 1}, None]),
            (),
            "scheduler.lr_lambdas[0]",
        ),
        (lambda s: s["accelerate"].update(step={"$tensor": "t0"}), (), "does not hold"),
        (lambda s: s["accelerate"]["scheduler"].update(evil=1), (), "keys"),
        (lambda s: s.update(world_size=2), (), "resume with 2 processes"),
        (lambda s: s.update(zero_stage=2), (), "DeepSpeed ZeRO-2"),
        (lambda s: s["files"].update({"../../x": {"bytes": 1, "sha256": "0"}}), (), "manifest"),
        (lambda s: s.update(format=3), (), "format 3"),
        (lambda s: None, ("train.ema=false",), None),  # an EMA in the checkpoint is not needed
    ],
)
def test_trainer_state_is_checked_before_use(runs, tmp_path, edit, overrides, problem):
    run_dir, step_dir = _copy(runs, tmp_path)
    _edit_state(step_dir, edit)
    if problem is None:
        _resume(run_dir, *overrides)
        return
    with pytest.raises(DataValidationError, match="Fix: ") as err:
        _resume(run_dir, *overrides)
    assert str(err.value).startswith(str(step_dir)) and problem in str(err.value), str(err.value)


def test_missing_ema_says_how_to_resume(runs, tmp_path):
    run_dir, step_dir = _copy(runs, tmp_path)
    (step_dir / "ema.safetensors").unlink()
    _edit_state(step_dir, lambda s: s["files"].pop("ema.safetensors"))
    with pytest.raises(DataValidationError, match="resume with train.ema=false"):
        _resume(run_dir)


def test_an_accelerate_save_state_checkpoint_is_refused_with_the_reason(runs, tmp_path):
    run_dir, step_dir = _copy(runs, tmp_path)
    marker = tmp_path / "MARKER"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        torch.save({"x": Payload(marker)}, step_dir / name)
    _edit_state(step_dir, lambda s: [s.pop(k) for k in ("format", "files", "accelerate")])
    with pytest.raises(DataValidationError) as err:
        _resume(run_dir)
    line = str(err.value)
    assert "cannot be loaded safely" in line and "custom_checkpoint_0.pkl" in line
    assert "start the run again in a new run.dir" in line
    assert not marker.exists()


def test_resume_auto_never_silently_starts_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = _config(run_dir, "train.max_steps=2")
    fit(ToyStage(config), config, resume="auto")  # nothing to resume: says so, starts
    assert "no checkpoint in" in capsys.readouterr().err
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints" / "step_5").mkdir(parents=True)  # no trainer_state.json
    with pytest.raises(DataValidationError, match="none is complete"):
        resolve_resume("auto", run_dir)


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one_to_resume(
    runs, tmp_path, monkeypatch
):
    """The save of step 20 dies after the weights and optimizer are written (as SIGKILL would
    leave it): its hidden temp directory is never picked, step 10 is, and the resumed run
    still ends bitwise equal to the uninterrupted one."""
    import latentcell.trainer.checkpoint as checkpoint

    run_dir, _ = _copy(runs, tmp_path)
    real = checkpoint.rng_state
    monkeypatch.setattr(checkpoint, "rng_state", lambda: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        _resume(run_dir)
    partial = run_dir / "checkpoints" / ".tmp-step_20"
    assert {p.name for p in partial.iterdir()} >= {"model.safetensors", "optimizer.safetensors"}
    assert resolve_resume("auto", run_dir).name == "step_10"
    monkeypatch.setattr(checkpoint, "rng_state", real)
    _resume(run_dir)
    assert _equal(_weights(runs / "full"), _weights(run_dir))
    assert not partial.exists()  # the next save of that step replaced it
