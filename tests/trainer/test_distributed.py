"""Real multi-process training on CPU (gloo): 2-process DDP and 2-process DeepSpeed ZeRO-2
and ZeRO-3, launched exactly as a user would with ``accelerate launch``. Each must end with identical
weights on both ranks after feeding them disjoint cells. Every job has a deadline and is
killed, with all its processes, when it passes it (``launching.py``): a hang fails the test."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.launching import REPO, finish, kill_tree, run, start
from tests.trainer.launching import accelerate_exe as _accelerate

JOB = Path(__file__).with_name("dist_job.py")


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
    code, output = run(cmd, 600, REPO, env)
    assert code == 0, output[-6000:]
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


_PORTS = itertools.count(29500 + os.getpid() % 500 + 100)


def _cli_launch(args: list[str], deepspeed: int | None = None) -> subprocess.Popen:
    """`latentcell train vae` on 2 processes (DDP, or DeepSpeed ZeRO-``deepspeed``) on CPU,
    in its own process group, stderr merged into stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if deepspeed:
        config = REPO / "launch" / "deepspeed" / f"zero{deepspeed}.json"
        mode = ["--use_deepspeed", "--deepspeed_config_file", str(config)]
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    else:
        mode = ["--multi_gpu"]
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        _accelerate(), "launch", *mode, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(next(_PORTS)), "-m", "latentcell.launch", *args,
    ]  # fmt: skip
    return start(cmd, REPO, env)


def _vae_args(store: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["train", "vae"]
    for item in (
        f"data.path={store}", f"run.dir={run_dir}", "train.max_steps=40",
        "train.checkpoint_every=5", "train.keep_last=20", "train.eval_every=0",
        "train.progress=false", "train.seed=3", "data.batch_size=32", "model.n_hidden=32",
        "train.ema=true", "tracking.enabled=false", *extra,
    ):  # fmt: skip
        args += ["--set", item]
    return args


def _wait_for(path_fn, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 300
    while not path_fn():
        assert proc.poll() is None, f"finished before {what}: " + proc.stdout.read()[-3000:]
        if time.time() >= deadline:
            kill_tree(proc)
            pytest.fail(f"no {what} after 300 s: " + proc.communicate()[0][-3000:])
        time.sleep(0.01)


def _steps(run_dir: Path) -> list[int]:
    done = (run_dir / "checkpoints").glob("step_*/trainer_state.json")
    return sorted(int(p.parent.name.split("_")[1]) for p in done)


def test_ddp_sigterm_then_sigkill_then_resume_is_bitwise(small_store, tmp_path):
    """Two processes, EMA: SIGTERM to the whole job (as SLURM's scancel does; each worker also
    gets the launcher's forwarded copy) stops both at one step with a checkpoint; a resumed
    run killed with SIGKILL leaves its last complete checkpoint; the final resume ends with
    the uninterrupted run's weights and EMA, bit for bit."""
    ref = tmp_path / "ref" / "vae"
    reference = _cli_launch(_vae_args(small_store, ref))
    out = finish(reference, 600)
    assert reference.returncode == 0, out[-3000:]

    run_dir = tmp_path / "exp" / "vae"
    first = _cli_launch(_vae_args(small_store, run_dir))
    _wait_for(lambda: _steps(run_dir), first, "the first checkpoint")
    os.killpg(first.pid, signal.SIGTERM)
    out = finish(first, 300)
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, out[-3000:]  # the main process says it, once
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert step < 40 and _steps(run_dir)[-1] == step
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert {p.name for p in checkpoint.glob("loader_rank*.json")} == {
        "loader_rank0.json",
        "loader_rank1.json",
    }
    assert not (run_dir / "final").exists()

    second = _cli_launch([*_vae_args(small_store, run_dir), "--resume", "auto"])
    _wait_for(lambda: _steps(run_dir)[-1] > step, second, "a checkpoint after the resume")
    os.killpg(second.pid, signal.SIGKILL)
    out = finish(second, 60)
    assert f"resumed from {checkpoint} at step {step}" in out

    third = _cli_launch([*_vae_args(small_store, run_dir), "--resume", "auto"])
    out = finish(third, 600)
    assert third.returncode == 0, out[-3000:]
    assert sum(line.startswith("resumed from") for line in out.splitlines()) == 1
    for name in ("model", "ema"):
        a = load_file(str(ref / "final" / f"{name}.safetensors"))
        b = load_file(str(run_dir / "final" / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def _final_equal(a: Path, b: Path) -> None:
    for name in ("model", "ema"):
        x = load_file(str(a / "final" / f"{name}.safetensors"))
        y = load_file(str(b / "final" / f"{name}.safetensors"))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.fixture(scope="module")
def zero2_run(small_store, tmp_path_factory):
    """A 2-process ZeRO-2 run with EMA, checkpointed at steps 4 and 8."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path_factory.mktemp("zero2") / "vae"
    proc = _cli_launch(_vae_args(small_store, run_dir, "train.max_steps=8",
                                 "train.checkpoint_every=4", "data.batch_size=64"), 2)  # fmt: skip
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    return run_dir


def _plant(path: Path, marker: Path) -> None:
    import pickle

    from tests.trainer.test_safe_state import Payload

    path.write_bytes(pickle.dumps(Payload(marker)))


def test_zero2_resume_is_bitwise_and_ignores_planted_pickles(zero2_run, small_store, tmp_path):
    run_dir = tmp_path / "vae"
    shutil.copytree(zero2_run / "checkpoints" / "step_4", run_dir / "checkpoints" / "step_4")
    marker = tmp_path / "MARKER"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "random_states_1.pkl",
                 "scheduler.bin", "optimizer.bin", "pytorch_model/latest.pt"):  # fmt: skip
        _plant(run_dir / "checkpoints" / "step_4" / name, marker)
    proc = _cli_launch([*_vae_args(small_store, run_dir, "train.max_steps=8",
                                   "train.checkpoint_every=4", "data.batch_size=64"),
                        "--resume", "auto"], 2)  # fmt: skip
    out = finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_4'} at step 4" in out
    assert not marker.exists()
    _final_equal(zero2_run, run_dir)


def test_deepspeed_files_load_only_through_the_weights_only_allow_list(zero2_run, tmp_path):
    """The swapped-in loader reads every real ZeRO-2 file and refuses a payload in one."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.trainer.deepspeed_checkpoint import use_safe_loader

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(),
                             load_universal_checkpoint=lambda: False)  # fmt: skip
    use_safe_loader(engine, lambda path: "restore it")
    files = sorted((zero2_run / "checkpoints" / "step_8" / "pytorch_model").glob("*.pt"))
    assert len(files) == 3
    for file in files:
        assert isinstance(engine.checkpoint_engine.load(str(file), map_location="cpu"), dict)
    from tests.trainer.test_safe_state import Payload

    marker = tmp_path / "MARKER"
    torch.save({"optimizer_state_dict": Payload(marker)}, tmp_path / "x.pt")
    with pytest.raises(DataValidationError, match="x.pt: contents: refused by the weights-only"):
        engine.checkpoint_engine.load(str(tmp_path / "x.pt"))
    assert not marker.exists()


@pytest.mark.slow
def test_zero2_payload_in_a_partition_of_one_process_fails_on_every_process(
    zero2_run, small_store, tmp_path
):
    """A payload (with a matching manifest) in rank 1's ZeRO partition: both processes fail
    with one line naming the file before DeepSpeed's collectives; nothing runs, nothing hangs."""
    import hashlib
    import json

    step_dir = tmp_path / "vae" / "checkpoints" / "step_4"
    shutil.copytree(zero2_run / "checkpoints" / "step_4", step_dir)
    name = "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "MARKER"
    _plant(step_dir / name, marker)
    state = json.loads((step_dir / "trainer_state.json").read_text())
    data = (step_dir / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))
    proc = _cli_launch([*_vae_args(small_store, tmp_path / "vae", "train.max_steps=8",
                                   "data.batch_size=64"), "--resume", "auto"], 2)  # fmt: skip
    out = finish(proc, 300)
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(
        line.startswith(f"error: {step_dir / name}: ") for line in errors
    ), out[-3000:]
    assert not marker.exists()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--nproc_per_node", "2", "--master_port", str(next(_PORTS)),
           str(Path(__file__).with_name("toy_job.py")), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    code, out = run(cmd, 300, REPO, env)
    return subprocess.CompletedProcess(cmd, code, stdout=out, stderr=out)  # output merged


def test_a_signal_to_one_process_stops_both_at_one_step_and_units_are_gathered(tmp_path):
    """SIGTERM to process 1 only: the flag rides on the per-step reduction, so process 0 stops
    at the same step; the corrupt units both loaders reported are gathered, deduplicated,
    kept in the checkpoint and reach summary.json after the resume."""
    import json

    from tests.trainer.toy_job import UNITS

    run_dir = tmp_path / "toy"
    first = _torchrun(str(run_dir), "first")
    outcomes = [json.loads((tmp_path / f"outcome_rank{r}.json").read_text()) for r in (0, 1)]
    assert [o["stopped"] for o in outcomes] == [7, 7], first.stderr[-3000:]
    assert [o["signum"] for o in outcomes] == [signal.SIGTERM] * 2
    assert [o["process_index"] for o in outcomes] == [0, 1]  # one DDP world, not 2 runs
    state = json.loads((run_dir / "checkpoints" / "step_7" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["skipped_units"] == UNITS
    assert first.stderr.count("stopped by SIGTERM at step 7") == 1

    resumed = _torchrun(str(run_dir), "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 20
    assert summary["data"] == {"skipped_units": UNITS, "n_skipped_units": 3}
