"""The DiT (EMA on by default) under DeepSpeed ZeRO-3 on 2 CPU processes: the EMA update
gathers the sharded parameters, so the run trains and its ``ema.safetensors`` is a real
average of full weights (with ``ema_decay=0.01`` it sits right at the final model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentcell.trainer.deepspeed_config import LAUNCH_DATA
from tests.trainer.launching import accelerate_exe, run
from tests.trainer.test_dit_stage import train_vae


def test_dit_with_ema_trains_under_zero3(small_store, tmp_path):
    pytest.importorskip("deepspeed")
    vae = train_vae(small_store, tmp_path / "vae", "train.max_steps=10")
    ds = json.loads((LAUNCH_DATA / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
    (tmp_path / "zero3_shard_all.json").write_text(json.dumps(ds))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [accelerate_exe(), "launch", "--use_deepspeed", "--deepspeed_config_file",
           "zero3_shard_all.json", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29200 + os.getpid() % 500),
           "-m", "latentcell.launch", "train", "dit"]  # fmt: skip
    for item in (f"data.path={small_store}", "run.dir=dit", f"vae.run={vae}",
                 "data.batch_size=64", "model.hidden=32", "model.depth=1", "model.heads=2",
                 "model.patch_size=2", "optim.lr=1e-2", "optim.warmup_steps=0",
                 "train.max_steps=6", "train.eval_every=3",
                 "train.checkpoint_every=3", "train.ema_decay=0.01", "train.progress=false",
                 "tracking.enabled=false"):  # fmt: skip
        cmd += ["--set", item]
    code, out = run(cmd, 400, cwd=tmp_path, env=env)
    assert code == 0, out[-4000:]
    summary = json.loads((tmp_path / "dit" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    assert "val_ema/loss" in summary["val"]
    model = load_file(str(tmp_path / "dit" / "final" / "model.safetensors"))
    ema = load_file(str(tmp_path / "dit" / "final" / "ema.safetensors"))
    assert set(model) <= set(ema)
    for key, weight in model.items():
        assert ema[key].shape == weight.shape, key
        torch.testing.assert_close(ema[key], weight, atol=1e-3, rtol=0, msg=key)
