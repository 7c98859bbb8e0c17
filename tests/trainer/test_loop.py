"""The loop's own guarantees, on a toy stage: skipping non-finite losses, EMA, checkpoint
pruning and atomicity, disjoint data per step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.checkpoint import resolve_resume
from latentcell.trainer.config import load_config
from latentcell.trainer.ema import EMA
from latentcell.trainer.loop import NonFiniteLossError, fit
from tests.trainer.toy_stage import ToyRunConfig, ToyStage


def _config(tmp_path, *overrides):
    return load_config(
        ToyRunConfig,
        None,
        [f"run.dir={tmp_path / 'toy'}", "train.progress=false", "tracking.log_every=5", *overrides],
    )


def test_run_writes_checkpoints_and_keeps_last_k(tmp_path):
    config = _config(
        tmp_path, "train.max_steps=25", "train.checkpoint_every=5", "train.keep_last=2"
    )
    result = fit(ToyStage(config), config)
    ckpts = sorted(p.name for p in (tmp_path / "toy" / "checkpoints").iterdir())
    assert ckpts == ["step_20", "step_25"]
    assert result.step == 25 and result.last_checkpoint.name == "step_25"
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 25 and state["world_size"] == 1
    assert (result.final_dir / "model.safetensors").exists()
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["step"] == 25 and "val/loss" in summary["val"]


def test_each_epoch_sees_every_cell_once(tmp_path):
    config = _config(tmp_path, "train.max_steps=30", "train.checkpoint_every=0")
    stage = ToyStage(config)
    fit(stage, config)
    rows = np.concatenate(stage.rows_seen)
    first_epoch = rows[:480]
    assert sorted(first_epoch.tolist()) == list(range(480))
    assert len(rows) == 30 * 16


def test_nonfinite_loss_is_skipped_without_an_update(tmp_path):
    config = _config(tmp_path, "train.max_steps=12", "train.checkpoint_every=0")
    result = fit(ToyStage(config, nan_at=(4,)), config)
    assert result.train_metrics["train/skipped_batches"] == 1.0
    weights = load_file(str(result.final_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_persistent_nonfinite_loss_stops_with_advice(tmp_path):
    config = _config(tmp_path, "train.max_steps=20", "train.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="--resume"):
        fit(ToyStage(config, nan_at=tuple(range(2, 20))), config)


def test_ema_weights_are_saved_and_differ(tmp_path):
    config = _config(tmp_path, "train.max_steps=15", "train.ema=true", "train.ema_decay=0.9")
    result = fit(ToyStage(config), config)
    model = load_file(str(result.final_dir / "model.safetensors"))
    ema = load_file(str(result.final_dir / "ema.safetensors"))
    assert set(ema) == set(model)
    assert not torch.equal(ema["linear.weight"], model["linear.weight"])
    assert "val_ema/loss" in result.val_metrics


def test_ema_known_answer():
    layer = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(layer, decay=0.5)
    for value in (2.0, 4.0, 8.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update(layer)
    # first update copies (2), then 0.5*2 + 0.5*4 = 3, then 0.5*3 + 0.5*8 = 5.5
    assert ema.module.weight.item() == pytest.approx(5.5)
    restored = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.module.weight.item() == pytest.approx(5.5)


def test_resume_auto_ignores_an_unfinished_save(tmp_path):
    run_dir = tmp_path / "run"
    assert resolve_resume("auto", run_dir) is None  # nothing yet: fresh start
    (run_dir / "checkpoints" / "step_10").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_10" / "trainer_state.json").write_text("{}")
    (run_dir / "checkpoints" / ".tmp-step_20").mkdir()  # killed mid-save
    (run_dir / "checkpoints" / "step_30").mkdir()  # no trainer_state: incomplete
    assert resolve_resume("auto", run_dir).name == "step_10"
    with pytest.raises(DataValidationError, match="not a complete checkpoint"):
        resolve_resume(str(run_dir / "checkpoints" / "step_30"), run_dir)


def test_resume_in_process_matches_uninterrupted(tmp_path):
    full = _config(tmp_path / "a", "train.max_steps=20", "train.checkpoint_every=10")
    fit(ToyStage(full), full)
    crashed = _config(tmp_path / "b", "train.max_steps=20", "train.checkpoint_every=10")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyStage(crashed, crash_after=13), crashed)  # dies 3 steps after step_10
    stage = ToyStage(crashed)
    result = fit(stage, crashed, resume="auto")
    assert len(stage.rows_seen) == 10  # resumed at step 10: only the last 10 steps ran
    a = load_file(str(tmp_path / "a" / "toy" / "final" / "model.safetensors"))
    b = load_file(str(result.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # The stream's cell order does not depend on the batch size, so 2 accumulated batches of
    # 8 cells are the same cells as one batch of 16: the updates must agree.
    big = _config(tmp_path / "big", "train.max_steps=6", "data.batch_size=16")
    accumulated = _config(
        tmp_path / "acc", "train.max_steps=6", "data.batch_size=8", "train.grad_accum_steps=2"
    )
    a = fit(ToyStage(big), big)
    stage = ToyStage(accumulated)
    b = fit(stage, accumulated)
    assert len(stage.rows_seen) == 12  # 6 steps x 2 micro-batches
    wa = load_file(str(a.final_dir / "model.safetensors"))
    wb = load_file(str(b.final_dir / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_skipped_nonfinite_batches_are_said_once_a_minute_and_counted(tmp_path, capsys):
    config = _config(tmp_path, "train.max_steps=12", "train.checkpoint_every=0")
    fit(ToyStage(config, nan_at=(4, 5, 9)), config)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "non-finite loss" in line]
    assert lines == [
        "step 4: non-finite loss on 1 of 1 process(es): batch skipped with no update, 1 so far "
        "(said at most once a minute; train.max_nonfinite=20 in a row stop the run)"
    ]
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["skipped_batches"] == 3 and summary["train"]["train/skipped_batches"] == 3


def test_corrupt_units_the_loader_skipped_survive_resume_and_reach_the_summary(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    bad = {"file": "shard-000003.tar", "problem": "sha256 mismatch"}
    other = {"file": "chunk 7", "problem": "cannot decompress"}
    overrides = ("train.max_steps=12", "train.checkpoint_every=5", "tracking.enabled=true",
                 "tracking.log_model=false")  # fmt: skip
    config = _config(tmp_path, *overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyStage(config, crash_after=7, corrupt_at={1: bad, 3: other, 4: bad}), config)
    state = json.loads(
        (tmp_path / "toy" / "checkpoints" / "step_5" / "trainer_state.json").read_text()
    )
    assert state["skipped_units"] == [bad, other]
    capsys.readouterr()
    result = fit(ToyStage(config, corrupt_at={2: bad}), config, resume="auto")  # found again
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["data"] == {"skipped_units": [bad, other], "n_skipped_units": 2}
    lines = [line for line in capsys.readouterr().err.splitlines() if "corrupt data unit" in line]
    assert lines == [
        f"skipped 2 corrupt data unit(s) (data.on_corrupt=skip), first shard-000003.tar: sha256 "
        f"mismatch; all listed in {tmp_path / 'toy' / 'summary.json'}"
    ]
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.mlflow_run_id).data.tags["data/skipped_units"] == "2"


def test_a_loader_without_corrupt_units_leaves_no_data_section(tmp_path):
    config = _config(tmp_path, "train.max_steps=3")
    fit(ToyStage(config), config)
    assert "data" not in json.loads((tmp_path / "toy" / "summary.json").read_text())


def test_an_empty_training_loader_is_an_error_not_an_endless_loop():
    """Epochs without a batch (nothing to train on) stop with one clear error."""
    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.trainer.loop import _epochs

    class Empty:
        epochs = []

        def __iter__(self):
            return iter(())

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    with pytest.raises(DataValidationError, match="no batch in a whole epoch"):
        next(_epochs(Empty(), 0))
    assert Empty.epochs == [1]  # gave up after the second empty epoch
