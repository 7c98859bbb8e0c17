"""Real ``accelerate launch`` / torchrun jobs for the tests, that fail fast instead of hanging.

Every job runs in its own session with a deadline. On timeout the whole tree is killed: the
launcher's process group and every descendant found before the kill (torchrun starts its
workers in sessions of their own, so killing the group alone would orphan them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def accelerate_exe() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    return str(exe) if exe.exists() else shutil.which("accelerate")


def start(cmd: list[str], cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` in its own session, stderr merged into stdout."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and all its descendants."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The job's output once it ends; after ``timeout`` s the tree is killed and the test fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"job still running after {timeout:g} s, killed: {proc.args}\n{out[-3000:]}")
    return out


def run(cmd: list[str], timeout: float, cwd: Path = REPO, env: dict | None = None):
    """``cmd`` to the end (or killed at ``timeout``): (exit code, merged output)."""
    proc = start(cmd, cwd, env)
    out = finish(proc, timeout)
    return proc.returncode, out
