"""The ST under DeepSpeed ZeRO-3 on 2 CPU processes, every parameter sharded: it trains, and
ends at DDP's validation loss. It used to fail on its first backward pass (its segment
embedding was a bare Parameter indexed in ``predict``, which ZeRO-3 does not gather)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latentcell.trainer.deepspeed_config import LAUNCH_DATA
from tests.trainer.launching import accelerate_exe, run

TINY_ST = ("model.hidden=32", "model.depth=1", "model.heads=2", "data.set_size=16",
           "data.sets_per_batch=4", "train.max_steps=6", "train.eval_every=6",
           "train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false")  # fmt: skip


def _launch(tmp_path: Path, store: Path, run_dir: str, *launcher: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    if "--use_deepspeed" not in launcher:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [accelerate_exe(), "launch", *launcher, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29200 + (os.getpid() + len(run_dir)) % 500),
           "-m", "latentcell.launch", "train", "st"]  # fmt: skip
    for item in (f"data.path={store}", f"run.dir={run_dir}", *TINY_ST):
        cmd += ["--set", item]
    code, out = run(cmd, 400, cwd=tmp_path, env=env)
    assert code == 0, out[-4000:]
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_st_under_zero3_matches_ddp(small_store, tmp_path):
    pytest.importorskip("deepspeed")
    ds = json.loads((LAUNCH_DATA / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
    (tmp_path / "zero3_shard_all.json").write_text(json.dumps(ds))
    zero3 = _launch(tmp_path, small_store, "st_zero3", "--use_deepspeed",
                    "--deepspeed_config_file", "zero3_shard_all.json")  # fmt: skip
    ddp = _launch(tmp_path, small_store, "st_ddp", "--multi_gpu")
    assert zero3["world_size"] == ddp["world_size"] == 2 and zero3["step"] == 6
    assert zero3["val"]["val/loss"] == pytest.approx(ddp["val"]["val/loss"], rel=1e-5)
