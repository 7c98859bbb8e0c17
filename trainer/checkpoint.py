"""Atomic, resumable checkpoints that load without unpickling anything.

``RUN_DIR/checkpoints/step_<N>/`` (format 2)::

    trainer_state.json        written last (its presence marks a complete checkpoint): step,
                              world size, distributed mode, the loop's counters, the MLflow run
                              id, Accelerate's step counter, the LR scheduler's and (fp16) the
                              GradScaler's states, and a manifest (bytes, sha256) of every file
    model.safetensors         the full weights (gathered under ZeRO-3): the portable file
    optimizer.safetensors     the optimizer state (a ``safe_state`` tree); not under DeepSpeed
    ema.safetensors           the EMA (``AveragedModel`` state, ``n_averaged`` included)
    rng_rank<R>.safetensors   process R's generators (python, numpy, torch CPU, CUDA)
    loader_rank<R>.json       process R's data-loader position
    pytorch_model/            DeepSpeed only: its module and ZeRO optimizer partitions

Why not ``accelerator.save_state``: it pickles (``optimizer.bin``, ``scheduler.bin``,
``random_states_<R>.pkl``) and unpickles registered objects such as the EMA
(``custom_checkpoint_0.pkl``) with ``weights_only=False``, so a crafted file in a shared run
directory runs code on ``--resume auto``. Here everything is safetensors or JSON, read with
readers that can only fail; files a checkpoint does not list (a planted ``optimizer.bin``) are
never opened. What ``save_state`` stored is all here: weights, optimizer, scheduler, scaler,
RNG states and ``accelerator.step`` (Accelerate's gradient-accumulation counter).

DeepSpeed keeps its partitioned optimizer in its own ``torch.save`` files; they are read
through ``deepspeed_checkpoint.py`` with ``torch.load(weights_only=True)`` and a four-class
allow-list. Everything else of ours (EMA, RNG, scheduler, counters) is read from our own safe
files.

The manifest: safetensors has no checksum, so a truncated or bit-flipped file could load
silently, or fail on one process while the others wait in a collective. Before anything is
loaded, the processes check a share of the files each against the manifest and agree on the
first bad one; every failure ends the run with one ``DataValidationError`` naming the file.
The manifest is not a signature (whoever can write the directory can rewrite it): safety
comes from the readers, integrity from the manifest. A checkpoint in Accelerate's old pickle
layout is refused with the reason; reading it would mean unpickling.

A write goes into a hidden temp directory renamed only once every process has finished, so a
run killed mid-save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.safe_paths import name_problem

from .deepspeed_checkpoint import safe_torch_load, use_safe_loader
from .distributed import is_deepspeed, zero_stage
from .safe_state import decode, encode, load_tree, rng_state, save_tree, set_rng_state

__all__ = [
    "FORMAT",
    "CheckpointManager",
    "resolve_resume",
    "write_safetensors",
]

FORMAT = 2  # 1 (no "format" key): Accelerate's save_state layout, which pickles
_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # the sub-directory name Accelerate gives DeepSpeed's files
_LEGACY = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def loader_file(rank: int) -> str:
    return f"loader_rank{rank}.json"


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
    (fresh start if there is none at all). Otherwise a checkpoint directory, which must be
    complete. Never a silent fresh start when checkpoints exist but none is complete."""
    if not resume:
        return None
    root = Path(run_dir) / "checkpoints"
    if resume == "auto":
        found = _step_dirs(root)
        if found:
            return found[-1][1]
        started = sorted(p for p in root.glob("step_*") if _STEP_DIR.match(p.name))
        if started:
            raise DataValidationError(
                started[-1], TRAINER_STATE, "missing from every checkpoint, so none is complete",
                f"restore it, or move {root} away to start the run from scratch",
            )  # fmt: skip
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise DataValidationError(
            path, TRAINER_STATE, "not a complete checkpoint",
            f"pass a {root}/step_<N> directory or --resume auto",
        )  # fmt: skip
    return path


def _fix(path: Path) -> str:
    step_dir = next((p for p in (path, *path.parents) if _STEP_DIR.match(p.name)), path)
    return (
        f"restore the file, or delete {step_dir} to resume from the previous checkpoint "
        "(or train without --resume)"
    )


def _mode(stage: int | None) -> str:
    return f"DeepSpeed ZeRO-{stage}" if stage else "no DeepSpeed"


def _first_line(err: BaseException) -> str:
    return (" ".join(str(err).split()) or type(err).__name__)[:200]


class CheckpointManager:
    """Save, prune and restore the checkpoints of one run directory (every process calls
    ``save`` and ``load`` together)."""

    def __init__(
        self, accelerator: Accelerator, run_dir: Path, keep_last: int, model, optimizer,
        scheduler, ema=None,
    ) -> None:  # fmt: skip
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.deepspeed = is_deepspeed(accelerator)

    # ----- saving -------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict[str, Any], loader_state: dict) -> Path:
        acc = self.accelerator
        main, rank = acc.is_main_process, acc.process_index
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.deepspeed:  # DeepSpeed decides which process writes which of its files
            self.model.save_checkpoint(str(tmp), DEEPSPEED_TAG, save_latest=False)
        if main or zero_stage(acc) == 3:  # gathering ZeRO-3 shards is a collective
            weights = acc.get_state_dict(self.model)
        if main:
            write_safetensors(weights, tmp / WEIGHTS)
            if not self.deepspeed:
                save_tree(self.optimizer.state_dict(), tmp / OPTIMIZER)
            if self.ema is not None:
                write_safetensors(self.ema.state_dict(), tmp / EMA_FILE)
        save_tree(rng_state(), tmp / rng_file(rank))
        (tmp / loader_file(rank)).write_text(json.dumps(loader_state))
        acc.wait_for_everyone()
        self._hash_share(tmp)
        acc.wait_for_everyone()
        if main:
            state = {
                "format": FORMAT,
                **trainer_state,
                "step": step,
                "world_size": acc.num_processes,
                "zero_stage": zero_stage(acc),
                "accelerate": encode(self._accelerate_state()),  # JSON only: no tensors
                "files": self._merge_hashes(tmp),
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _accelerate_state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": int(self.accelerator.step),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def _hash_share(self, tmp: Path) -> None:
        """Each process hashes every world-size-th file (the files are on a shared disk)."""
        acc = self.accelerator
        files = sorted(
            p.relative_to(tmp).as_posix()
            for p in tmp.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        mine = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for i, name in enumerate(files)
            if i % acc.num_processes == acc.process_index
        }
        (tmp / f".files_rank{acc.process_index}.json").write_text(json.dumps(mine))

    def _merge_hashes(self, tmp: Path) -> dict[str, dict]:
        files: dict[str, dict] = {}
        for part in sorted(tmp.glob(".files_rank*.json")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        return dict(sorted(files.items()))

    def _prune(self) -> None:
        for _, path in _step_dirs(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ----- loading ------------------------------------------------------------------------

    def load(self, path: Path) -> tuple[dict[str, Any], dict]:
        """Restore everything ``save`` wrote; returns (trainer_state, this rank's loader state).

        Every problem (a file missing, changed, truncated, of the wrong shape, or not what it
        claims to be) raises ``DataValidationError`` on every process, naming one file."""
        path = Path(path)
        state = self._read_trainer_state(path)
        names = sorted(state["files"])
        self._verify_files(path, state["files"], names)
        error: DataValidationError | None = None
        read: dict[str, Any] = {}
        try:  # read and check everything this process needs; nothing is applied yet
            read = self._read(path, state)
        except DataValidationError as err:
            error = err
        self._agree(path, names, error)
        if self.deepspeed:  # collective; its files are already read (and checked) above
            loaded, _ = self.model.load_checkpoint(str(path), DEEPSPEED_TAG)
            if loaded is None:
                raise DataValidationError(path / DEEPSPEED_TAG, "files", "DeepSpeed found no "
                                          "checkpoint here", _fix(path))  # fmt: skip
        try:
            self._apply(path, read)
        except DataValidationError as err:
            error = err
        self._agree(path, names, error)
        return state, read["loader"]

    def _read_trainer_state(self, path: Path) -> dict[str, Any]:
        acc = self.accelerator
        file = path / TRAINER_STATE
        fix = _fix(file)
        try:
            state = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise DataValidationError(file, "contents", f"not readable JSON ({_first_line(err)})",
                                      fix) from None  # fmt: skip
        if not isinstance(state, dict):
            raise DataValidationError(file, "contents", "not a JSON object", fix)
        version = state.get("format")
        if version is None:
            found = [n for n in _LEGACY if (path / n).exists()] or ["pickled state files"]
            raise DataValidationError(
                path, "format", f"written by an older latentcell through Accelerate's save_state "
                f"({', '.join(found)}): those files are pickles and cannot be loaded safely",
                "start the run again in a new run.dir (its final/ weights, if any, are "
                "safetensors and stay usable), or resume with the older latentcell if you trust "
                "every file in the directory",
            )  # fmt: skip
        if version != FORMAT:
            raise DataValidationError(file, "format", f"checkpoint format {version!r}, this "
                                      f"latentcell reads {FORMAT}", "use the latentcell that "
                                      "wrote it")  # fmt: skip
        files = state.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) and name_problem(k) is None for k, v in files.items()
        ):  # fmt: skip
            raise DataValidationError(file, "files", "malformed file manifest", fix)
        if state.get("world_size") != acc.num_processes:
            raise DataValidationError(
                file, "world_size", f"written by {state.get('world_size')} processes, this run "
                f"has {acc.num_processes}; each process's data position is its own",
                f"resume with {state.get('world_size')} processes",
            )  # fmt: skip
        if state.get("zero_stage") != zero_stage(acc):
            raise DataValidationError(
                file, "zero_stage", f"written with {_mode(state.get('zero_stage'))}, this run "
                f"uses {_mode(zero_stage(acc))}", "resume with the launcher config that wrote it",
            )  # fmt: skip
        required = [WEIGHTS] + [
            f(r) for r in range(acc.num_processes) for f in (rng_file, loader_file)
        ]
        if self.deepspeed and not any(n.startswith(DEEPSPEED_TAG + "/") for n in files):
            required.append(DEEPSPEED_TAG + "/")
        if not self.deepspeed:
            required.append(OPTIMIZER)
        missing = [n for n in required if n not in files]
        if missing:
            raise DataValidationError(file, "files", f"the checkpoint holds no {missing[0]}", fix)
        if self.ema is not None and EMA_FILE not in files:
            raise DataValidationError(file, "files", "the checkpoint holds no EMA",
                                      "resume with train.ema=false")  # fmt: skip
        return state

    def _first_across_ranks(self, value: int) -> int:
        acc = self.accelerator
        if acc.num_processes == 1:
            return value
        gathered = acc.gather(torch.tensor([value], dtype=torch.int64, device=acc.device))
        return int(gathered.min().item())

    def _verify_files(self, path: Path, files: dict[str, dict], names: list[str]) -> None:
        """Each process checks every world-size-th file (size, then sha256); all agree on the
        first bad one and raise naming it."""
        acc = self.accelerator
        bad, problem = len(names), ""
        for i, name in enumerate(names):
            if i % acc.num_processes != acc.process_index:
                continue
            file, expected = path / name, files[name]
            if not file.is_file():
                bad, problem = i, "missing"
            elif file.stat().st_size != expected["bytes"]:
                problem = f"{file.stat().st_size} bytes, {expected['bytes']} were written"
                bad, problem = i, f"truncated or changed ({problem})"
            elif sha256_file(file) != expected["sha256"]:
                bad, problem = i, "changed since it was written (sha256 differs)"
            if bad < len(names):
                break
        first = self._first_across_ranks(bad)
        if first < len(names):
            if first != bad:
                problem = "missing or changed since it was written (found by another process)"
            raise DataValidationError(path / names[first], "file", problem, _fix(path))

    def _agree(self, path: Path, names: list[str], error: DataValidationError | None) -> None:
        """Raise on every process if any failed to restore (else the others would wait in
        the first training collective), naming the first failing file."""
        index = len(names) + 1  # no error here
        if error is not None:
            try:
                index = names.index(Path(error.path).relative_to(path).as_posix())
            except ValueError:  # not a manifest file (trainer_state.json): all read it
                index = len(names)
        first = self._first_across_ranks(index)
        if error is not None and first == index:
            raise error
        if first <= len(names):
            where = path / names[first] if first < len(names) else path
            raise DataValidationError(
                where, "contents", "could not be restored (see the error of another process)",
                _fix(path),
            )  # fmt: skip

    def _read(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Every file this process needs, read by readers that cannot run code, and checked
        against this run (names, shapes, types)."""
        acc = self.accelerator
        rank = acc.process_index
        read: dict[str, Any] = {}
        if self.deepspeed:
            cache = use_safe_loader(self.model, _fix)
            for file in self._deepspeed_files(path, state["files"]):
                cache[os.path.abspath(file)] = safe_torch_load(file, "cpu", _fix(file))
        else:
            read["model"] = _read_tensors(path / WEIGHTS)
            read["optimizer"] = saved = load_tree(path / OPTIMIZER, _fix(path / OPTIMIZER))
            try:
                _check_optimizer_state(saved, self.optimizer)
            except (KeyError, TypeError, ValueError) as err:
                raise DataValidationError(path / OPTIMIZER, "state", _first_line(err),
                                          _fix(path)) from None  # fmt: skip
        if self.ema is not None:
            read["ema"] = _read_tensors(path / EMA_FILE)
        read["accelerate"] = self._read_accelerate_state(path / TRAINER_STATE, state)
        rng = path / rng_file(rank)
        read["rng"] = load_tree(rng, _fix(rng))
        loader = path / loader_file(rank)
        try:
            read["loader"] = json.loads(loader.read_text())
        except ValueError as err:
            raise DataValidationError(loader, "contents", f"not JSON ({_first_line(err)})",
                                      _fix(loader)) from None  # fmt: skip
        if not isinstance(read["loader"], dict):
            raise DataValidationError(loader, "contents", "not a JSON object", _fix(loader))
        return read

    def _deepspeed_files(self, path: Path, files: dict[str, dict]) -> list[Path]:
        """The DeepSpeed files this process's engine will read: the model states (every
        process: one per model-parallel rank; per process under ZeRO-3) and its own ZeRO
        partition (every partition when the config asks for elastic checkpoints)."""
        rank = self.accelerator.process_index
        elastic = bool(self.model.zero_elastic_checkpoint())
        out = []
        for name in files:
            base = name.removeprefix(DEEPSPEED_TAG + "/")
            if base == name or "/" in base:
                continue
            if re.fullmatch(r"mp_rank_\d+_model_states\.pt", base) or (
                base.startswith(f"zero_pp_rank_{rank}_") or (elastic and "optim_states" in base)
            ):
                out.append(path / name)
        return out

    def _read_accelerate_state(self, file: Path, state: dict[str, Any]) -> dict[str, Any]:
        try:
            saved = decode(state.get("accelerate"))  # no tensor table: a tensor is an error
            if not isinstance(saved, dict):
                raise ValueError("not an object")
            _check_same_shape(saved["scheduler"], self.scheduler.state_dict(), "scheduler")
            scaler = self.accelerator.scaler
            if scaler is not None and saved.get("scaler"):
                _check_same_shape(saved["scaler"], scaler.state_dict(), "scaler")
            step = saved["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step must be a non-negative integer, got {step!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise DataValidationError(file, "accelerate", _first_line(err), _fix(file)) from None
        return saved

    def _apply(self, path: Path, read: dict[str, Any]) -> None:
        """Put what ``_read`` checked into the model, optimizer, scheduler, EMA and RNGs."""
        acc = self.accelerator
        if not self.deepspeed:
            _load_module(acc.unwrap_model(self.model), read["model"], path / WEIGHTS)
            try:
                self.optimizer.load_state_dict(read["optimizer"])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise DataValidationError(path / OPTIMIZER, "state", _first_line(err),
                                          _fix(path)) from None  # fmt: skip
        if self.ema is not None:
            _load_module(self.ema.averaged, read["ema"], path / EMA_FILE)
        saved = read["accelerate"]
        try:
            self.scheduler.load_state_dict(saved["scheduler"])
            if acc.scaler is not None and saved.get("scaler"):
                acc.scaler.load_state_dict(saved["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataValidationError(path / TRAINER_STATE, "accelerate", _first_line(err),
                                      _fix(path)) from None  # fmt: skip
        acc.step = saved["step"]
        rng = path / rng_file(acc.process_index)
        try:  # last: nothing may draw from the generators after this
            set_rng_state(read["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataValidationError(rng, "contents", f"not a generator state "
                                      f"({_first_line(err)})", _fix(rng)) from None  # fmt: skip


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type
        raise DataValidationError(file, "contents", f"not a safetensors file "
                                  f"({_first_line(err)})", _fix(file)) from None  # fmt: skip


def _load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    try:
        module.load_state_dict(tensors)  # strict: names and shapes must match
    except RuntimeError as err:
        raise DataValidationError(file, "tensors", _first_line(err), _fix(file)) from None


def _check_same_shape(saved: Any, current: Any, where: str) -> None:
    """``saved`` must have ``current``'s keys, value types and list lengths, and None where it
    has None: a scheduler's state is applied with ``__dict__.update``, so nothing else may
    slip in."""
    if current is None or isinstance(current, bool):
        ok = saved is current if current is None else isinstance(saved, bool)
    elif isinstance(current, (int, float)):
        ok = isinstance(saved, (int, float)) and not isinstance(saved, bool)
        ok = ok and (isinstance(current, float) or isinstance(saved, int))
    elif isinstance(current, (list, tuple)):
        ok = isinstance(saved, (list, tuple)) and len(saved) == len(current)
        if ok:
            for i, (a, b) in enumerate(zip(saved, current, strict=True)):
                _check_same_shape(a, b, f"{where}[{i}]")
    elif isinstance(current, dict):
        ok = isinstance(saved, dict)
        if ok and set(saved) != set(current):
            odd = sorted(map(str, set(saved) ^ set(current)))
            raise ValueError(f"{where}: keys {odd} differ from this run's state")
        if ok:
            for key, value in current.items():
                _check_same_shape(saved[key], value, f"{where}.{key}")
    else:
        ok = type(saved) is type(current)
    if not ok:
        raise ValueError(f"{where}: {saved!r:.60} does not fit this run's {current!r:.60}")


def _check_optimizer_state(saved: Any, optimizer) -> None:
    """Every per-parameter tensor must match its parameter's shape: ``load_state_dict`` does
    not check, and a wrong shape would only fail (or broadcast) at the next step."""
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        raise ValueError("not an optimizer state (no 'state' / 'param_groups')")
    groups = optimizer.param_groups
    if not isinstance(saved["param_groups"], list) or len(saved["param_groups"]) != len(groups):
        raise ValueError(f"{len(saved['param_groups'])} parameter groups, expected {len(groups)}")
    params = {}
    for group, current in zip(saved["param_groups"], groups, strict=True):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(current["params"]):
            raise ValueError("parameter groups differ from this run's model")
        params.update(zip(ids, current["params"], strict=True))
    if not isinstance(saved["state"], dict):
        raise ValueError("'state' is not a mapping")
    for pid, entry in saved["state"].items():
        if pid not in params or not isinstance(entry, dict):
            raise ValueError(f"state for unknown parameter {pid!r}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.ndim and value.shape != params[pid].shape:
                raise ValueError(f"parameter {pid} {key}: shape {tuple(value.shape)}, expected "
                                 f"{tuple(params[pid].shape)}")  # fmt: skip
