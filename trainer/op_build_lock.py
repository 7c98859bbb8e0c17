"""Refuse to start DeepSpeed over a stale op-build lock instead of waiting on it forever.

DeepSpeed JIT-builds its ops (on CPU: ``deepspeed_shm_comm``, when the process group starts)
through ``torch.utils.cpp_extension.load``, which serialises builds with a ``FileBaton``: the
builder creates ``<extensions dir>/<op>/lock`` with ``O_CREAT | O_EXCL``, keeps it open while
it compiles and deletes it at the end; everyone else polls until the file is gone, silently
and with no limit. A build killed part-way leaves the file behind, and every later run hangs.

The rule (``stale_lock``): a lock is stale when no process on this host has it open (a live
build always does) and, when the launch spans several nodes (whose builds on a shared home
directory this host cannot see), it is also older than ``LATENTCELL_OP_LOCK_STALE_MINUTES``
(default 10). A fresh lock on a multi-node launch is waited for, at most until it turns stale.
Without ``/proc`` (not Linux) only the age counts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["check_op_build_locks", "extensions_dir", "stale_lock"]

STALE_ENV = "LATENTCELL_OP_LOCK_STALE_MINUTES"
DEFAULT_STALE_MINUTES = 10.0


def extensions_dir() -> Path:
    """The folder ``torch.utils.cpp_extension`` builds into (``_get_build_directory``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        device = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}"


def _stale_after_s() -> float:
    raw = os.environ.get(STALE_ENV, "")
    try:
        minutes = float(raw) if raw.strip() else DEFAULT_STALE_MINUTES
    except ValueError:
        minutes = -1.0
    if not minutes >= 0:
        raise DataValidationError(
            STALE_ENV, "value", f"{raw!r} is not a number of minutes >= 0",
            f"set it to minutes, e.g. {STALE_ENV}=10, or unset it",
        )  # fmt: skip
    return minutes * 60.0


def _held_open(lock: Path) -> bool | None:
    """Whether a process on this host has ``lock`` open; None when that cannot be seen."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == target:
                    return True
        except OSError:  # the process ended, or is another user's
            continue
    return False


def stale_lock(lock: Path, multi_node: bool, stale_after_s: float) -> bool:
    """The module's rule, for one lock file (False once the file is gone)."""
    try:
        first = lock.stat()
    except FileNotFoundError:
        return False
    held = _held_open(lock)
    if held:
        return False
    if held is None or multi_node:
        return time.time() - first.st_mtime >= stale_after_s
    time.sleep(0.2)  # a finishing build closes the file just before deleting it
    try:
        return lock.stat().st_ino == first.st_ino and not _held_open(lock)
    except FileNotFoundError:
        return False


def check_op_build_locks(multi_node: bool, poll_s: float = 2.0) -> None:
    """Raise one line naming a stale ``lock`` under the extensions folder; on a multi-node
    launch, first wait (until it turns stale) for a fresh one another node may be building."""
    root = extensions_dir()
    if not root.is_dir():
        return
    stale_after_s = _stale_after_s()
    for lock in sorted(root.glob("*/lock")):
        said = False
        while True:
            if stale_lock(lock, multi_node, stale_after_s):
                raise DataValidationError(
                    lock, "lock", "left by a killed DeepSpeed op build (no process on this host "
                    "holds it): DeepSpeed would wait for it forever",
                    f"delete {lock} if no other build is running (also on other nodes, on a "
                    "shared filesystem)",
                )  # fmt: skip
            if not multi_node or not lock.exists() or _held_open(lock):
                break  # gone, or a live build on this host that torch waits for
            if not said and os.environ.get("LOCAL_RANK", "0") == "0":
                said = True
                print(f"waiting for {lock}: a DeepSpeed op build on another node? (stale, "
                      f"and an error, after {stale_after_s / 60:g} min: {STALE_ENV})",
                      file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(poll_s)
