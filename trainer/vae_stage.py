"""The count-VAE training stage: its run config and how it builds model and loaders.

The model section holds only what a user chooses; sizes that come from the data (genes,
batches) are read from the store, and the resolved ``CountVAEConfig`` is saved next to the
weights (``final/model_config.json``) so a model can be rebuilt without the run config.

Cells: the store minus ``data.val_fraction`` of it held out for validation (whole read units
or cells stratified by the store's roles, ``data.split_by``: see ``val_split``), or, with
``split.file``, the train rows of that perturbation split (the rows ``train st`` trains on,
streamed through ``row_subset.RowSubset``) and its val rows for validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.perturbation_splits import SPLIT_ROWS, assign_split, save_split
from latentcell.data_pipelines.row_subset import split_sources
from latentcell.data_pipelines.stores import open_store
from latentcell.models.count_vae import LIKELIHOODS, CountVAE, CountVAEConfig, LatentMeanEncoder

from . import val_split
from .sections import (
    DataConfig,
    OptimConfig,
    RunSection,
    SplitFileSection,
    TrainConfig,
    check_split_section,
    split_card,
)
from .store_stage import CountStoreStage
from .tracking import TrackingConfig

__all__ = ["VAEModelSection", "VAERunConfig", "VAEStage"]


@dataclass(frozen=True)
class VAEModelSection:
    """The user's choices for ``CountVAEConfig``; ``batch_conditioning`` uses the store's
    batch role (if it has one) as the decoder's batch covariate."""

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    likelihood: str = "nb"
    dropout: float = 0.1
    batch_conditioning: bool = True
    encode_covariates: bool = False
    kl_warmup_steps: int = 400

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if min(self.n_latent, self.n_hidden, self.n_layers) < 1 or self.kl_warmup_steps < 0:
            raise ValueError("n_latent, n_hidden, n_layers must be >= 1, kl_warmup_steps >= 0")


@dataclass(frozen=True)
class VAERunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/vae"))
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitFileSection = field(default_factory=SplitFileSection)
    model: VAEModelSection = field(default_factory=VAEModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class VAEStage(CountStoreStage):
    name = "vae"
    config: VAERunConfig

    def __init__(self, config: VAERunConfig) -> None:
        super().__init__(config)
        check_split_section(config)
        self._model_config: CountVAEConfig | None = None

    # -- data (store and meta: CountStoreStage) -----------------------------------------------

    @property
    def split_path(self) -> Path:
        """The split's rows (``split.file`` only), as ``train st`` saves them."""
        return self.config.run.dir_path / SPLIT_ROWS

    def prepare_data(self, is_main_process: bool) -> None:
        if is_main_process:
            self._input.ensure_store()
            if self.config.split.file:
                save_split(assign_split(self.store, self.config.split.file), self.split_path.parent)
            elif val_split.used(self.config):  # stratified by data.stratify (default: roles)
                data = self.config.data
                val_split.prepare(self.store, data, data.stratify, self.config.run.dir_path, True)

    def _sources(self):
        data = self.config.data
        if self.config.split.file:
            return split_sources(self.store, self.split_path)
        if data.val_path:
            return partial(open_store, self.store), partial(open_store, Path(data.val_path))
        if data.val_fraction <= 0:
            return partial(open_store, self.store), None
        run_dir = self.config.run.dir_path
        return val_split.sources(self.store, self.store, data, data.stratify, run_dir)

    def _stream(self, source, rank: int, world_size: int, train: bool) -> CellStream:
        data = self.config.data
        config = CellStreamConfig(
            batch_size=data.batch_size,
            seed=self.config.train.seed,
            shuffle=train,
            buffer_units=data.buffer_units,
            # Validation pads too: every rank must run the same number of forwards (ZeRO-3
            # gathers weights collectively); pads are masked out of every metric.
            tail="pad",
            output="csr",
            on_corrupt=data.on_corrupt,
        )
        return CellStream(
            source,
            config,
            rank=rank,
            world_size=world_size,
            num_workers=data.num_workers if train else 0,
        )

    def train_loader(self, rank: int, world_size: int):
        return self._stream(self._sources()[0], rank, world_size, train=True).loader()

    def val_loader(self, rank: int, world_size: int):
        source = self._sources()[1]
        return None if source is None else self._stream(source, rank, world_size, False).loader()

    # -- model --------------------------------------------------------------------------------

    def model_config(self) -> CountVAEConfig:
        if self._model_config is None:
            meta = self.meta
            m = self.config.model
            batch_column = meta.roles.get("batch") if m.batch_conditioning else None
            n_batches = len(meta.categories[batch_column]) if batch_column else 0
            self._model_config = CountVAEConfig(
                n_genes=meta.n_genes,
                n_latent=m.n_latent,
                n_hidden=m.n_hidden,
                n_layers=m.n_layers,
                likelihood=m.likelihood,
                dropout=m.dropout,
                batch_key="batch" if n_batches else None,
                n_batches=n_batches,
                encode_covariates=m.encode_covariates,
                kl_warmup_steps=m.kl_warmup_steps,
            )
        return self._model_config

    def build_model(self) -> nn.Module:
        return CountVAE(self.model_config())

    def model_card(self) -> dict[str, Any]:
        card = dataclasses.asdict(self.model_config())
        card["covariate_keys"] = list(card["covariate_keys"])
        card["n_covariate_categories"] = list(card["n_covariate_categories"])
        out = {"class": "latentcell.models.count_vae.CountVAE", "config": card}
        if self.config.split.file:
            out["split"] = split_card(self.split_path)
        elif val_split.used(self.config):
            out["validation_split"] = val_split.read_record(self.config.run.dir_path)
        return out

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        example = np.zeros((2, self.model_config().n_genes), dtype=np.float32)
        example[:, :10] = 1.0
        return LatentMeanEncoder(model).eval(), example
