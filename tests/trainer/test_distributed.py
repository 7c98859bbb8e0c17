"""Real multi-process training on CPU (gloo): 2-process DDP and 2-process DeepSpeed ZeRO-2
and ZeRO-3, launched exactly as a user would with ``accelerate launch``. Each must end with identical
weights on both ranks after feeding them disjoint cells."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("dist_job.py")


def _accelerate() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")


def _launch(tmp_path: Path, store: Path, launch_args: list[str], env_extra: dict) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    cmd = [
        _accelerate(),
        "launch",
        *launch_args,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        str(JOB),
        str(out),
        f"data.path={store}",
        f"run.dir={out / 'vae'}",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.eval_every=0",
        "train.progress=false",
        "data.batch_size=64",
        "model.n_hidden=32",
        "tracking.log_every=4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _check_ranks(out: Path) -> None:
    w0 = load_file(str(out / "weights_rank0.safetensors"))
    w1 = load_file(str(out / "weights_rank1.safetensors"))
    assert set(w0) == set(w1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks ended with different weights"
    final = load_file(str(out / "vae" / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], w0[k]) for k in final)
    r0, r1 = np.load(out / "rows_rank0.npy"), np.load(out / "rows_rank1.npy")
    assert len(r0) == len(r1) == 8 * 64  # 8 steps x 64 cells, no padding needed here
    assert not set(r0.tolist()) & set(r1.tolist()), "ranks saw the same cells"
    assert len(np.unique(r0)) == len(r0)  # within the first epoch, no repeats
    ckpt = out / "vae" / "checkpoints" / "step_8"
    assert (ckpt / "loader_rank0.json").exists() and (ckpt / "loader_rank1.json").exists()
    assert (ckpt / "model.safetensors").exists()


def test_ddp_two_processes(small_store, tmp_path):
    out = _launch(tmp_path, small_store, ["--multi_gpu"], {"ACCELERATE_USE_CPU": "true"})
    _check_ranks(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes(small_store, tmp_path, stage):
    pytest.importorskip("deepspeed")
    config = REPO / "launch" / "deepspeed" / f"zero{stage}.json"
    out = _launch(
        tmp_path, small_store, ["--use_deepspeed", "--deepspeed_config_file", str(config)], {}
    )
    _check_ranks(out)
    assert (out / "vae" / "checkpoints" / "step_8" / "pytorch_model").is_dir()  # ZeRO layout
