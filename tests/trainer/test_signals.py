"""SIGTERM and Ctrl-C stop a run at a step boundary with a checkpoint, a KILLED MLflow run,
one line and exit code 128 + signal; ``--resume auto`` then ends with the weights of an
uninterrupted run. In-process on the toy stage, then as a user runs it: a real
``latentcell train`` process sent SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentcell.trainer.config import load_config
from latentcell.trainer.loop import TrainingStopped, fit
from tests.trainer.toy_stage import ToyRunConfig, ToyStage

REPO = Path(__file__).resolve().parents[2]

# SQLAlchemy 2.1 deprecates a loader MLflow 3.17 still configures; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _config(run_dir, *overrides):
    return load_config(
        ToyRunConfig,
        None,
        [f"run.dir={run_dir}", "train.progress=false", "tracking.log_every=5",
         "train.max_steps=20", "train.checkpoint_every=10", "train.ema=true",
         "train.eval_every=0", "tracking.log_model=false", *overrides],
    )  # fmt: skip


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(tmp_path, capsys, sig):
    from mlflow.tracking import MlflowClient

    reference = _config(tmp_path / "ref" / "toy", "tracking.enabled=false")
    fit(ToyStage(reference), reference)

    config = _config(tmp_path / "run" / "toy", "tracking.enabled=true")

    def send(batches: int) -> None:
        if batches == 7:  # before the 8th batch: the run stops after step 8
            os.kill(os.getpid(), sig)

    with pytest.raises(TrainingStopped) as stopped:
        fit(ToyStage(config, on_batch=send), config)
    assert stopped.value.step == 8 and stopped.value.exit_code == 128 + sig
    checkpoint = tmp_path / "run" / "toy" / "checkpoints" / "step_8"
    assert stopped.value.checkpoint == checkpoint and (checkpoint / "trainer_state.json").exists()
    err = capsys.readouterr().err
    assert (
        f"stopped by {sig.name} at step 8; checkpoint {checkpoint}; resume with --resume auto"
        in err
    )
    assert not (tmp_path / "run" / "toy" / "final").exists()
    assert signal.getsignal(sig) is not None  # handlers restored (pytest's own SIGINT one)
    client = MlflowClient(f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db")
    run = client.search_runs(client.get_experiment_by_name("latentcell").experiment_id)[0]
    assert run.info.status == "KILLED"

    stage = ToyStage(config)
    fit(stage, config, resume="auto")
    assert len(stage.rows_seen) == 12
    for name in ("model", "ema"):
        assert _equal(tmp_path / "ref" / "toy" / "final" / f"{name}.safetensors",
                      tmp_path / "run" / "toy" / "final" / f"{name}.safetensors"), name  # fmt: skip
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_second_signal_aborts_at_once_but_a_forwarded_copy_does_not():
    script = textwrap.dedent(
        """
        import os, signal, time
        from latentcell.trainer.signals import StopRequest

        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's forwarded copy: ignored
            print("requested", stop.requested, flush=True)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGTERM)  # a second request: the process dies
            time.sleep(5)
            print("survived", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "requested True\n", proc.stderr
    assert proc.returncode == -signal.SIGTERM


def _train_args(store: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["train", "vae"]
    for item in (
        f"data.path={store}", f"run.dir={run_dir}", "train.max_steps=100",
        "train.checkpoint_every=20", "train.eval_every=0", "train.progress=false",
        "train.seed=5", "data.batch_size=64", "model.n_hidden=32", "train.ema=true",
        "tracking.log_model=false", *extra,
    ):  # fmt: skip
        args += ["--set", item]
    return args


def test_sigterm_to_a_real_training_process_then_resume(small_store, tmp_path):
    from mlflow.tracking import MlflowClient

    cli = [sys.executable, "-m", "latentcell.launch"]
    ref = tmp_path / "ref" / "vae"
    reference = subprocess.run([*cli, *_train_args(small_store, ref, "tracking.enabled=false")],
                               cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "exp" / "vae"
    proc = subprocess.Popen([*cli, *_train_args(small_store, run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_20").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert '"final_weights"' not in out  # no result line: the run did not finish
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert 20 <= step < 100
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert lines[0] == (
        f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}; resume with --resume auto"
    )
    assert (checkpoint / "trainer_state.json").exists()
    client = MlflowClient(f"sqlite:///{(tmp_path / 'exp').resolve()}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("latentcell").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    resumed = subprocess.run([*cli, *_train_args(small_store, run_dir), "--resume", "auto", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if line.startswith("resumed from")]
    assert said == [f"resumed from {checkpoint} at step {step} (epoch {said[0].split('epoch ')[1]}"]
    assert json.loads(resumed.stdout.splitlines()[-1])["step"] == 100
    for name in ("model", "ema"):
        assert _equal(ref / "final" / f"{name}.safetensors",
                      run_dir / "final" / f"{name}.safetensors"), name  # fmt: skip
    assert client.get_run(runs[0].info.run_id).info.status == "FINISHED"
