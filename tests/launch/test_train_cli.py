"""`latentcell train vae` as a user runs it: config printing, clear errors, and a run killed
with SIGKILL that resumes to bitwise-identical weights and continues its MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentcell.launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_print_config_and_bad_keys():
    out = _cli("train", "vae", "--print-config", "--set", "train.max_steps=7")
    assert out.returncode == 0, out.stderr
    assert "[train]\nmax_steps = 7" in out.stdout and "[tracking]" in out.stdout
    bad = _cli("train", "vae", "--set", "train.max_step=7")
    assert bad.returncode == 2
    assert "error: unknown config key 'train.max_step'" in bad.stderr


def _train_args(store: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "vae",
        "--set",
        f"data.path={store}",
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "train.max_steps=500",
        "--set",
        "train.checkpoint_every=25",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.progress=false",
        "--set",
        "train.seed=5",
        "--set",
        "data.batch_size=64",
        "--set",
        "model.n_hidden=32",
        *extra,
    ]


def test_killed_run_resumes_bitwise_identical(small_store, tmp_path):
    from mlflow.tracking import MlflowClient

    reference = _cli(
        *_train_args(small_store, tmp_path / "ref" / "vae", "--set", "tracking.enabled=false")
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "exp" / "vae"
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentcell.launch", *_train_args(small_store, run_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_50").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()  # it really died mid-run

    resumed = _cli(*_train_args(small_store, run_dir), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "ref" / "vae" / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"

    client = MlflowClient(f"sqlite:///{(tmp_path / 'exp').resolve()}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("latentcell").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps[0] == 50 and steps[-1] == 500
