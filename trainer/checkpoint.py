"""Atomic, resumable checkpoints: ``RUN_DIR/checkpoints/step_<N>/``.

A checkpoint is ``accelerator.save_state`` (weights as ``model.safetensors``, optimizer,
scheduler, registered objects such as the EMA, every process's RNG states) plus what
Accelerate does not know about: each rank's data-loader position (``loader_rank<R>.json``)
and the loop's own counters (``trainer_state.json``). It is written into a hidden temp
directory and renamed only once every rank has finished, so a run killed mid-save leaves the
previous checkpoint as the latest complete one; ``--resume auto`` can always trust it.
Under DeepSpeed, ``save_state`` writes DeepSpeed's own layout; ``model.safetensors`` is then
added from ``accelerator.get_state_dict`` (gathered across ZeRO-3 shards) so every
checkpoint has the same portable weights file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

__all__ = ["CheckpointManager", "resolve_resume", "write_safetensors"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"


def write_safetensors(state: dict, path: Path) -> None:
    """A state dict as safetensors (CPU, contiguous), atomically: temp file, then rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``None``/``""``: fresh start. ``auto``: the latest complete checkpoint of ``run_dir``
    (fresh start if none). Otherwise a checkpoint directory, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = _step_dirs(run_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint (no {TRAINER_STATE}); "
            f"pass a {run_dir / 'checkpoints'}/step_<N> directory or 'auto'"
        )
    return path


class CheckpointManager:
    """Save, prune and restore the checkpoints of one run directory."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, keep_last: int) -> None:
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, trainer_state: dict[str, Any], loader_state: dict, model) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        (tmp / f"loader_rank{acc.process_index}.json").write_text(json.dumps(loader_state))
        if not (tmp / WEIGHTS).exists():  # DeepSpeed layout: add the portable weights file
            state = acc.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
            if acc.is_main_process:
                write_safetensors(state, tmp / WEIGHTS)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {**trainer_state, "step": step, "world_size": acc.num_processes}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for _, path in _step_dirs(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> tuple[dict[str, Any], dict]:
        """Restore everything ``save`` wrote; returns (trainer_state, this rank's loader state)."""
        acc = self.accelerator
        state = json.loads((path / TRAINER_STATE).read_text())
        if state.get("world_size", acc.num_processes) != acc.num_processes:
            raise RuntimeError(
                f"checkpoint {path} was written by {state['world_size']} processes but this run "
                f"has {acc.num_processes}; the data position is per process, so resume with the "
                "same number of processes"
            )
        acc.load_state(str(path))
        loader_state = json.loads((path / f"loader_rank{acc.process_index}.json").read_text())
        return state, loader_state
