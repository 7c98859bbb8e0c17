"""Everything about processes and devices, in one place: the Accelerator and its plugins.

The same code runs as one process, under ``accelerate launch`` (DDP), with DeepSpeed ZeRO
1/2/3 (``--use_deepspeed --deepspeed_config_file launch/deepspeed/zero2.json``) and on
several nodes; which one is decided by the launcher's environment, never by the loop.

Two things Accelerate does not do for a CPU cluster (see launch/README.md):
* under DeepSpeed the process group must exist as ``gloo`` before the Accelerator is built,
  or DeepSpeed picks a backend it cannot use and fails with a misleading batch-size
  assertion (for plain DDP the same early group would silently disable DDP);
* our loaders are not ``prepare``d (they shard themselves), so DeepSpeed cannot infer its
  ``train_micro_batch_size_per_gpu``; it is written into the plugin's config here.

Before DeepSpeed starts, its JSON path is made absolute (the repository's YAMLs name
``launch/deepspeed/zeroN.json``, found in the installed package when the working directory
has no such file) and a stale op-build lock stops the run with one line instead of a silent
wait forever (``op_build_lock.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from latentcell.data_pipelines.errors import verbose_console

from .sections import TrainConfig

__all__ = ["is_deepspeed", "make_accelerator", "resolve_precision", "zero_stage"]


def resolve_precision(requested: str) -> str:
    """``auto``: bf16 on GPUs that support it, else full fp32 (CPU autocast buys nothing
    for these model sizes and changes numerics)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_requested() -> bool:
    # Set by `accelerate launch --use_deepspeed` (or a DeepSpeed accelerate config). Only
    # then is the early gloo group needed: for plain DDP on CPU it would make Accelerate
    # see an already-initialized group and fall back to DistributedType.NO (no gradient
    # all-reduce: ranks silently train apart).
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _prepare_deepspeed_start() -> None:
    """The DeepSpeed JSON as an absolute path, and no stale op-build lock to wait on."""
    from .deepspeed_config import resolve_deepspeed_config
    from .op_build_lock import check_op_build_locks

    value = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if value != "none" and not value.lstrip().startswith("{"):  # a path, not inline JSON
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(resolve_deepspeed_config(value))
    world = _world_size_from_env()
    check_op_build_locks(multi_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world)


def _deepspeed_prints_muted():
    """DeepSpeed announces its communication op with ``print`` on every process ("DeepSpeed
    ... built successfully"); mute stdout while it starts unless its logger shows notices
    (the console's ``--verbose``, ``launch/console.py``). Errors still raise."""
    if not _deepspeed_requested() or verbose_console():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())


def make_accelerator(train: TrainConfig, micro_batch_size: int, grad_clip: float) -> Accelerator:
    """The run's Accelerator, with gloo on CPU and DeepSpeed's batch sizes filled in."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=30))
    if _deepspeed_requested() and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        raise RuntimeError(
            "ACCELERATE_USE_CPU=true with DeepSpeed: Accelerate would silently drop DeepSpeed. "
            "Unset ACCELERATE_USE_CPU for DeepSpeed runs (it is only needed for DDP on CPU)"
        )
    if _deepspeed_requested():
        _prepare_deepspeed_start()
    precision = resolve_precision(train.mixed_precision)
    with _deepspeed_prints_muted():
        if not torch.cuda.is_available() and _world_size_from_env() > 1 and _deepspeed_requested():
            PartialState(backend="gloo", timeout=timedelta(minutes=30))
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=train.grad_accum_steps,
            step_scheduler_with_optimizer=False,  # the loop steps it once per optimizer step
            kwargs_handlers=[timeout],
        )
    launched = _world_size_from_env()
    if launched > 1 and (
        accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO
    ):
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate joined "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): they would train "
            "separate models. On CPU launch DDP with `ACCELERATE_USE_CPU=true accelerate "
            "launch --multi_gpu ...` (see launch/README.md)"
        )
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = train.grad_accum_steps
        ds["train_batch_size"] = (
            micro_batch_size * train.grad_accum_steps * accelerator.num_processes
        )
        # DeepSpeed clips inside its engine step; accelerator.clip_grad_norm_ only reads the norm.
        ds["gradient_clipping"] = grad_clip
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    """DeepSpeed's ZeRO stage, or None when DeepSpeed is not in use."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)
