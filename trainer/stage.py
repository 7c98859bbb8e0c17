"""What the loop needs from a training stage, and nothing more.

A stage (the count VAE, later the latent DiT and the set transformer) builds its model and
its loaders; the model's forward returns an output dataclass with ``loss`` (the scalar to
backpropagate), ``n_cells`` (real cells in the batch, to weight averages) and
``metrics()`` (per-cell means to log). The loop never looks further inside.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class StepOutput(Protocol):
    loss: torch.Tensor
    n_cells: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]: ...


class Loader(Protocol):
    """A resumable per-rank batch stream (``latentcell.data_pipelines`` loaders)."""

    def __iter__(self): ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stage(Protocol):
    name: str

    def prepare_data(self, is_main_process: bool) -> None:
        """Create anything on disk the loaders need (main process only; the loop waits)."""

    def build_model(self) -> nn.Module: ...

    def train_loader(self, rank: int, world_size: int) -> Loader: ...

    def val_loader(self, rank: int, world_size: int) -> Loader | None: ...

    def model_card(self) -> dict[str, Any]:
        """The fully resolved model config (data-derived sizes included), saved with it."""

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        """(module taking one array, an input example) for ``mlflow.pytorch.log_model``."""


# Optional, looked up with getattr: ``final_report(model) -> dict[str, float]``, checks of the
# trained model (final weights, EMA when kept) written to summary.json under "checks" and
# logged as the run tags ``check/<name>`` (the DiT stage reports its latent memorization ratio).
# ``final_figures(model, run_dir) -> list[Path]``: PNGs of the trained model (the same copy
# ``final_report`` got) written into run_dir and logged under the MLflow run's ``figures/``
# (the DiT stage draws its generated against real latents on a PCA).
# ``store``: the path of the count store the stage trains on (read after ``prepare_data``),
# logged as the MLflow run's dataset input (``tracking.store_dataset``); the count-store
# stages and the DiT stage have it.
# ``init_report() -> dict | None``, called after ``build_model``: what the initial weights
# came from (the ST stage's ``init.run``: vocabularies matched, tensors loaded / remapped /
# fresh). Its "console" lines are printed when training starts; the whole dict goes to
# summary.json under "init" and to MLflow as the artifact init.json, its scalar entries as
# params ``init.<key>.<key>``.
