"""Exponential moving average of a model's weights, checkpointed with the run.

``torch.optim.swa_utils.AveragedModel`` does the averaging (its first update copies the
weights, later ones apply ``decay``); this wrapper only adds what the trainer needs: a
frozen copy, a ``state_dict`` of plain tensors (``n_averaged`` and ``module.*``) that the
checkpoint writes as ``ema.safetensors``, and the averaged module for validation and export.
It is deliberately not registered with ``accelerator.register_for_checkpointing``: Accelerate
saves registered objects as ``custom_checkpoint_<i>.pkl`` and unpickles them with
``weights_only=False`` on resume (see ``checkpoint.py``).

Under DeepSpeed ZeRO-3 each process holds only a shard of every large parameter, so
``update`` gathers them for the moment of the update (one all-gather per optimizer step,
which every process reaches) and the average stays a full, unsharded copy on every process:
validation, ``ema.safetensors`` and resume work as under DDP, at the memory cost of one
full fp32 copy of the model per process.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.averaged.requires_grad_(False)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (same class and config)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s weights; a collective under ZeRO-3 (every process calls)."""
        with _full_weights(model):
            self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def _full_weights(model: nn.Module):
    """ZeRO-3's partitioned parameters gathered for reading, or nothing to do."""
    sharded = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed  # only reached when DeepSpeed already sharded the model

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
