"""A DeepSpeed op build killed part-way leaves ``<extensions dir>/<op>/lock`` behind; the next
run stops with one line naming it instead of waiting forever (``op_build_lock.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.op_build_lock import check_op_build_locks, extensions_dir
from tests.trainer.launching import accelerate_exe, run


@pytest.fixture
def lock(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    path = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    path.parent.mkdir(parents=True)
    path.touch()
    return path


def test_a_lock_nobody_holds_is_one_line_naming_it(lock):
    assert extensions_dir() == lock.parents[1]
    with pytest.raises(DataValidationError) as err:
        check_op_build_locks(multi_node=False)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{lock}: lock: left by a killed DeepSpeed op")
    assert f"Fix: delete {lock} if no other build is running" in line


def test_a_lock_a_live_build_holds_is_left_to_torch(lock):
    fd = os.open(lock, os.O_RDONLY)  # what FileBaton keeps open while it builds
    try:
        check_op_build_locks(multi_node=False)
        check_op_build_locks(multi_node=True)
    finally:
        os.close(fd)


def test_no_extensions_dir_or_no_lock_is_fine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "absent"))
    check_op_build_locks(multi_node=False)
    (tmp_path / "absent" / "op").mkdir(parents=True)
    check_op_build_locks(multi_node=False)


def test_multi_node_waits_for_a_fresh_lock_until_it_is_stale(lock, monkeypatch, capsys):
    """Another node may be building on a shared filesystem: wait, but only until the lock is
    older than LATENTCELL_OP_LOCK_STALE_MINUTES."""
    monkeypatch.setenv("LATENTCELL_OP_LOCK_STALE_MINUTES", "0.02")  # 1.2 s
    start = time.monotonic()
    with pytest.raises(DataValidationError, match="lock: left by a killed"):
        check_op_build_locks(multi_node=True, poll_s=0.1)
    assert 0.9 < time.monotonic() - start < 10
    assert "waiting for" in capsys.readouterr().err


def test_multi_node_lock_that_goes_away_is_fine(lock, monkeypatch):
    monkeypatch.setenv("LATENTCELL_OP_LOCK_STALE_MINUTES", "10")
    os.utime(lock, (time.time() - 5, time.time() - 5))
    import threading

    threading.Timer(0.3, lock.unlink).start()  # the other node's build finishes
    check_op_build_locks(multi_node=True, poll_s=0.05)


def test_a_bad_threshold_is_one_line(lock, monkeypatch):
    monkeypatch.setenv("LATENTCELL_OP_LOCK_STALE_MINUTES", "soon")
    with pytest.raises(DataValidationError, match="LATENTCELL_OP_LOCK_STALE_MINUTES: value"):
        check_op_build_locks(multi_node=True)


def test_a_real_deepspeed_launch_exits_2_at_once(lock, small_store, tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(lock.parents[1])}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [accelerate_exe(), "launch", "--config_file", "launch/accelerate/zero2.yaml",
           "--num_processes", "2", "--main_process_port", str(29300 + os.getpid() % 500),
           "-m", "latentcell.launch", "train", "vae", "--set", f"data.path={small_store}",
           "--set", f"run.dir={tmp_path / 'vae'}", "--set", "tracking.enabled=false"]  # fmt: skip
    start = time.monotonic()
    code, out = run(cmd, 120, env=env)
    assert code != 0 and time.monotonic() - start < 120
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(e.startswith(f"error: {lock}: lock: ") for e in errors), out
    assert not (tmp_path / "vae").exists()
