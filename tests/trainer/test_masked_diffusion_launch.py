"""Pretrain -> fine-tune of the masked-diffusion family on 2 CPU processes, launched as a user
would with ``accelerate launch``: pretraining under DDP, then fine-tuning from it through
``init.run`` under DDP and under DeepSpeed ZeRO-2. Both fine-tunes start from the pretrained
weights and bins and end at the same validation loss (ZeRO-2 shards the optimizer state,
not the arithmetic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latentcell.trainer.deepspeed_config import LAUNCH_DATA
from tests.trainer.launching import accelerate_exe, run

TINY = ("model.hidden=32", "model.depth=1", "model.heads=2", "model.control_depth=1",
        "model.n_bins=8", "model.patch_size=8", "data.set_size=16", "data.sets_per_batch=2",
        "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=0",
        "train.progress=false", "tracking.enabled=false")  # fmt: skip


def _launch(tmp_path: Path, family: str, settings: list[str], *launcher: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    if "--use_deepspeed" not in launcher:
        env["ACCELERATE_USE_CPU"] = "true"
    run_dir = next(s.split("=", 1)[1] for s in settings if s.startswith("run.dir="))
    cmd = [accelerate_exe(), "launch", *launcher, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29700 + (os.getpid() + len(run_dir)) % 200),
           "-m", "latentcell.launch", "train", family]  # fmt: skip
    for item in (*settings, *TINY):
        cmd += ["--set", item]
    code, out = run(cmd, 400, cwd=tmp_path, env=env)
    assert code == 0, out[-4000:]
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_pretrain_then_fine_tune_under_ddp_and_zero2(small_store, tmp_path):
    pytest.importorskip("deepspeed")
    pre = _launch(tmp_path, "masked-diffusion-pretrain",
                  [f"data.path={small_store}", "run.dir=pre"], "--multi_gpu")  # fmt: skip
    assert pre["world_size"] == 2 and pre["step"] == 6
    fine_tune = [f"data.path={small_store}", f"init.run={tmp_path / 'pre'}"]
    ddp = _launch(tmp_path, "masked-diffusion", [*fine_tune, "run.dir=ft_ddp"], "--multi_gpu")
    zero2 = _launch(tmp_path, "masked-diffusion", [*fine_tune, "run.dir=ft_zero2"],
                    "--use_deepspeed", "--deepspeed_config_file",
                    str(LAUNCH_DATA / "deepspeed" / "zero2.json"))  # fmt: skip
    assert ddp["world_size"] == zero2["world_size"] == 2 and zero2["step"] == 6
    assert (tmp_path / "ft_zero2" / "final" / "model.safetensors").exists()
    for summary in (ddp, zero2):
        assert summary["init"]["genes"]["order"] == "equal"
        assert summary["init"]["n_tensors"]["loaded"] > 20
    assert zero2["val"]["val/loss"] == pytest.approx(ddp["val"]["val/loss"], rel=1e-4)
    pre_edges = json.loads((tmp_path / "pre" / "final" / "model_config.json").read_text())
    card = json.loads((tmp_path / "ft_zero2" / "final" / "model_config.json").read_text())
    assert card["bins"]["edges"] == pre_edges["bins"]["edges"]
