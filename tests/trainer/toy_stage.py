"""A tiny stage for testing the loop itself: a linear model on in-memory cells.

Its loss can be made non-finite at chosen steps, and it records the rows each process saw,
so the loop's guarantees are checked without any real model in the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.trainer.sections import DataConfig, OptimConfig, RunSection, TrainConfig
from latentcell.trainer.tracking import TrackingConfig


@dataclass(frozen=True)
class ToyRunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=16))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=2))
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))


@dataclass
class ToyOutput:
    loss: torch.Tensor
    n_cells: torch.Tensor

    def metrics(self):
        return {"loss": self.loss.detach()}


class ToyModel(nn.Module):
    """Predicts the first gene from the others; ``nan_at`` makes chosen calls return nan."""

    def __init__(self, n_genes: int, nan_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.linear = nn.Linear(n_genes - 1, 1)
        self.nan_at = set(nan_at)
        self.calls = 0

    def forward(self, batch, step=0):
        X = batch["X"].to_dense() if batch["X"].layout != torch.strided else batch["X"]
        keep = ~batch["is_pad"]
        err = (self.linear(X[:, 1:]).squeeze(-1) - X[:, 0]) ** 2
        loss = err[keep].mean()
        if self.training:
            if self.calls in self.nan_at:
                loss = loss * float("nan")
            self.calls += 1
        return ToyOutput(loss=loss, n_cells=keep.sum())


def toy_store(n_cells: int = 480, n_genes: int = 8, seed: int = 0) -> InMemoryStore:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    X[:, 0] = X[:, 1:4].sum(1) * 0.5
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n_cells)})
    return InMemoryStore.from_obs(sp.csr_matrix(X), obs, roles={"batch": "batch"}, unit_cells=40)


class ToyStage:
    name = "toy"

    def __init__(
        self,
        config: ToyRunConfig,
        nan_at: tuple[int, ...] = (),
        crash_after: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        corrupt_at: dict[int, dict] | None = None,
    ) -> None:
        self.config = config
        self.nan_at = nan_at
        self.crash_after = crash_after  # raise after this many batches (a simulated crash)
        self.on_batch = on_batch  # called with the number of batches fed so far
        # {batch number: {"file", "problem"}}: the loader "finds" a corrupt unit there and
        # reports it through corrupt_units(), as data.on_corrupt="skip" loaders do
        self.corrupt_at = corrupt_at
        self.store = toy_store()
        self.rows_seen: list[np.ndarray] = []

    def prepare_data(self, is_main_process: bool) -> None:
        pass

    def build_model(self) -> nn.Module:
        return ToyModel(self.store.meta.n_genes, self.nan_at)

    def _loader(self, rank, world, train):
        cfg = CellStreamConfig(
            batch_size=self.config.data.batch_size, seed=self.config.train.seed, shuffle=train
        )
        return CellStream(self.store, cfg, rank=rank, world_size=world).loader()

    def train_loader(self, rank, world):
        loader = self._loader(rank, world, True)
        stage = self

        found: list[dict] = []

        class Recording:
            def __iter__(self):
                for batch in loader:
                    if stage.crash_after is not None and len(stage.rows_seen) >= stage.crash_after:
                        raise RuntimeError("simulated crash")
                    if stage.on_batch is not None:
                        stage.on_batch(len(stage.rows_seen))
                    if stage.corrupt_at and len(stage.rows_seen) in stage.corrupt_at:
                        found.append(stage.corrupt_at[len(stage.rows_seen)])
                    stage.rows_seen.append(batch["row"][~batch["is_pad"]].numpy())
                    yield batch

            def __len__(self):
                return len(loader)

            def set_epoch(self, epoch):
                loader.set_epoch(epoch)

            def state_dict(self):
                return loader.state_dict()

            def load_state_dict(self, state):
                loader.load_state_dict(state)

        if self.corrupt_at is not None:
            Recording.corrupt_units = lambda self: list(found)
        return Recording()

    def val_loader(self, rank, world):
        return self._loader(rank, world, False)

    def model_card(self):
        return {"class": "ToyModel"}

    def serving_module(self, model):
        return model.linear, np.zeros((2, self.store.meta.n_genes - 1), dtype=np.float32)
