"""Reading DeepSpeed's checkpoint files without unpickling arbitrary objects.

DeepSpeed writes its module and ZeRO optimizer partitions with ``torch.save`` and reads them
through its pluggable ``engine.checkpoint_engine``, whose ``TorchCheckpointEngine.load`` calls
``torch.load(weights_only=False)``: a crafted file in a shared run directory would run code on
resume. Rewriting ZeRO's checkpointing would be far more code than the problem, so only the
loader is swapped (:func:`use_safe_loader`): ``torch.load(weights_only=True)``, whose
unpickler rebuilds tensors, containers and an explicit allow-list and calls nothing else. The
allow-list is the four plain classes DeepSpeed 0.19's ZeRO-1/2/3 files hold besides tensors
and containers: its two loss scalers, the ZeRO stage enum and the fragment address (a
dataclass of two ints). Saving stays DeepSpeed's own.

The swapped loader also takes files read beforehand (its cache): the checkpoint manager reads
every file this process's engine will read before DeepSpeed's collective load starts, so a
refused file stops every process instead of leaving the others waiting in a collective.
Custom checkpoint engines and universal checkpoints load with pickle elsewhere in DeepSpeed,
so they are refused.
"""

from __future__ import annotations

import os
import pickle  # only for its error type: nothing here unpickles
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["safe_globals", "safe_torch_load", "use_safe_loader"]


def safe_globals() -> list:
    """The only non-container, non-tensor types in DeepSpeed 0.19's checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location=None, fix: str = "") -> Any:
    """``torch.load(weights_only=True)`` with :func:`safe_globals`; any failure becomes a
    ``DataValidationError`` naming ``path`` (torch's own text advises ``weights_only=False``,
    which is exactly what must not be done with an untrusted file)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        needs = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(err))
        what = f"it names {needs.group(1)}" if needs else "it holds more than tensors"
        problem = f"refused by the weights-only loader ({what}; loading it could run code)"
        raise DataValidationError(path, "contents", problem, fix) from None
    except Exception as err:
        detail = (" ".join(str(err).split()) or type(err).__name__)[:200]
        problem = f"not a readable DeepSpeed file ({detail})"
        raise DataValidationError(path, "contents", problem, fix) from None


def use_safe_loader(engine: Any, fix_for: Callable[[Path], str]) -> dict[str, Any]:
    """Make ``engine`` (a DeepSpeedEngine) read checkpoint files with :func:`safe_torch_load`
    (``fix_for(path)`` is the advice of its errors). Returns the loader's cache: objects put
    there by absolute path are handed over instead of read again."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    current = engine.checkpoint_engine
    cache = getattr(current, "_latentcell_cache", None)
    if cache is not None:
        return cache
    universal = engine.load_universal_checkpoint()
    if type(current) is not TorchCheckpointEngine or universal:
        raise DataValidationError(
            "DeepSpeed config", "checkpoint", f"{type(current).__name__}"
            f"{' (universal checkpoint)' if universal else ''} loads with pickle, which "
            "latentcell refuses on resume",
            "remove the checkpoint engine / load_universal settings from the DeepSpeed config",
        )  # fmt: skip
    cache = {}

    def load(path: str, map_location=None):
        cached = cache.pop(os.path.abspath(path), None)
        if cached is not None:
            return cached
        return safe_torch_load(path, map_location, fix_for(Path(path)))

    current.load = load  # this instance's loader only
    current._latentcell_cache = cache
    return cache
