"""The ST pretraining stage: masked set reconstruction on an observational store.

    latentcell train st-pretrain --set data.path=OBS_STORE --set run.dir=DIR [...]
    latentcell train st --set data.path=VCC_STORE --set init.run=DIR [...]   # fine-tune

- Data: sets of ``data.set_size`` cells of one group, (cell type, batch) on an scBaseCount
  store (``data_pipelines.group_sets.GroupSetSampler``; on a perturbation store a group is
  (cell type, perturbation, batch)); ``data.sets_per_batch`` sets per step and process.
  With ``data.path`` empty the run uses the built-in synthetic store that ``train st`` uses
  too, so the two stages share a gene vocabulary.
- Validation: whole GROUPS are held out, about ``data.val_fraction`` of the cells
  (``group_sets.split_groups``, seeded by ``data.split_seed``), so validation measures
  reconstruction on cell types of samples the model never saw. Read units could not be used:
  set sampling needs the group index, which a unit subset has not. The split is a pure
  function of the store and the two settings; it is saved in ``RUN_DIR/split.json``.
- Objective and output: ``models.st_pretrain`` (masked MSE + energy distance; metrics
  ``loss``, ``masked_mse``, ``masked_mse_input`` = the corrupted-input baseline,
  ``energy``).
- Model: ``STPretrainModel`` adds no parameter to ``STModel``; the model section has
  ``STModelSection``'s meaning, so the same ``model.hidden/depth/heads/conditioning/
  mlp_ratio`` give tensors the fine-tuning stage loads (by name, gene and label axes mapped
  by key: ``init_from_run.py``); the fine-tuning store shares the pretraining genes in full
  with ``latentcell data build --genes-from PRETRAIN_RUN``, and partly otherwise. The
  covariate conditioning defaults to off: a set is one group, so its cells already tell the
  model the cell type and sample, and scBaseCount's cell types and SRX accessions are
  rarely the fine-tuning store's labels (those tables map by label, so they would mostly
  start fresh anyway).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.group_sets import (
    GroupSetConfig,
    GroupSetSampler,
    GroupSplit,
    split_groups,
    stack_sets,
)
from latentcell.data_pipelines.stores import open_store
from latentcell.models.perturbation_encoders import PerturbationEncoderConfig
from latentcell.models.st_model import STConfig, STShape
from latentcell.models.st_pretrain import MaskedSetObjective, STPretrainModel

from .sections import OptimConfig, RunSection, TrainConfig
from .set_batches import SetBatches, require_sets
from .st_sections import SetDataSection, store_card
from .store_stage import CountStoreStage
from .tracking import TrackingConfig

__all__ = [
    "MODEL_CLASS",
    "STPretrainDataSection",
    "STPretrainModelSection",
    "STPretrainRunConfig",
    "STPretrainStage",
    "build_st_pretrain_model",
]

MODEL_CLASS = "latentcell.models.st_pretrain.STPretrainModel"
DEFAULT_CONTROL = "non-targeting"


@dataclass(frozen=True)
class STPretrainDataSection(SetDataSection):
    """path: an observational store (``latentcell data build --schema scbasecount``) or any
    count store; "" = the built-in synthetic store. val_fraction: share of cells held out as
    whole groups (0 = no validation); split_seed picks them. min_group_cells: smaller groups
    are left out of training and validation. The other keys: ``SetDataSection``."""

    min_group_cells: int = 1
    val_fraction: float = 0.05
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_group_cells < 1 or self.split_seed < 0:
            raise ValueError("min_group_cells must be >= 1, split_seed >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class STPretrainModelSection(STShape):
    """The transferable part of ``STModelSection`` (the ``STShape`` keys: same names, same
    meaning, same checks), and the covariates, off by default (see the module docstring)."""

    cell_type_conditioning: bool = False
    batch_conditioning: bool = False


@dataclass(frozen=True)
class STPretrainRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/st_pretrain"))
    data: STPretrainDataSection = field(default_factory=STPretrainDataSection)
    model: STPretrainModelSection = field(default_factory=STPretrainModelSection)
    objective: MaskedSetObjective = field(default_factory=MaskedSetObjective)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def build_st_pretrain_model(card: dict) -> STPretrainModel:
    """The model a card describes (weights not loaded)."""
    config = STConfig.from_dict(card["config"])
    return STPretrainModel(config, MaskedSetObjective(**card["objective"]))


class STPretrainStage(CountStoreStage):
    name = "st-pretrain"
    config: STPretrainRunConfig

    def __init__(self, config: STPretrainRunConfig) -> None:
        super().__init__(config)
        self._split: GroupSplit | None = None
        self._model_config: STConfig | None = None

    # -- data (store and meta: CountStoreStage) -----------------------------------------------

    def split(self) -> GroupSplit:
        """Training and held-out groups (the same on every process; see the docstring)."""
        if self._split is None:
            d = self.config.data
            index = open_store(self.store).group_index()
            try:
                self._split = split_groups(index, d.val_fraction, d.split_seed)
            except DataValidationError as err:  # name the store, not just its index
                raise DataValidationError(self.store, err.field, err.problem, err.fix) from err
        return self._split

    def prepare_data(self, is_main_process: bool) -> None:
        if not is_main_process:
            return
        self._input.ensure_store()
        split = self.split()
        out = self.config.run.dir_path
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "split.json.tmp"
        tmp.write_text(json.dumps(self._split_summary(split), indent=1))
        tmp.replace(out / "split.json")

    def _split_summary(self, split: GroupSplit) -> dict:
        meta = self.meta

        def name(role: str, code: int) -> str:
            column = meta.roles.get(role)
            return meta.categories[column][code] if column and code >= 0 else ""

        return {
            "held_out": "groups",
            "group_keys": ["cell_type", "perturbation", "batch"],
            "val_fraction": self.config.data.val_fraction,
            "split_seed": self.config.data.split_seed,
            "n_train_groups": len(split.train),
            "n_val_groups": len(split.val),
            "n_train_cells": split.n_train_cells,
            "n_val_cells": split.n_val_cells,
            "val_groups": [
                {
                    "codes": list(key),
                    "cell_type": name("cell_type", key[0]),
                    "perturbation": name("perturbation", key[1]),
                    "batch": name("batch", key[2]),
                }
                for key in split.val
            ],
        }

    def _sampler(self, groups, rank: int, world_size: int, train: bool) -> SetBatches:
        d = self.config.data
        config = GroupSetConfig(
            **d.sampler_options(self.config.train.seed, train), min_group_cells=d.min_group_cells
        )
        sampler = GroupSetSampler(
            partial(open_store, self.store), config, rank=rank, world_size=world_size,
            num_workers=d.num_workers if train else 0, groups=groups,
        )  # fmt: skip
        if train:
            require_sets(sampler, self.store)
        return SetBatches(sampler.loader(), d.sets_per_batch, stack=stack_sets)

    def train_loader(self, rank: int, world_size: int) -> SetBatches:
        return self._sampler(self.split().train, rank, world_size, train=True)

    def val_loader(self, rank: int, world_size: int) -> SetBatches | None:
        val = self.split().val
        return self._sampler(val, rank, world_size, train=False) if val else None

    # -- model --------------------------------------------------------------------------------

    def model_config(self) -> STConfig:
        if self._model_config is None:
            meta, m = self.meta, self.config.model
            n_types = n_batches = 0
            if m.cell_type_conditioning and meta.roles.get("cell_type"):
                n_types = len(meta.categories[meta.roles["cell_type"]])
            if m.batch_conditioning and meta.roles.get("batch"):
                n_batches = len(meta.categories[meta.roles["batch"]])
            control = meta.control_label or DEFAULT_CONTROL
            self._model_config = STConfig(
                **m.shape_kwargs(),
                n_features=meta.n_genes,
                perturbation_labels=(control,),
                space="gene",
                shift_path=False,  # one label, the control: nothing to shift by
                n_cell_types=n_types,
                n_batches=n_batches,
                perturbation=PerturbationEncoderConfig(
                    kind="onehot", dim=m.hidden, control_label=control
                ),
            )
        return self._model_config

    def build_model(self) -> nn.Module:
        return STPretrainModel(self.model_config(), self.config.objective)

    def model_card(self) -> dict[str, Any]:
        meta = self.meta
        split_file = self.config.run.dir_path / "split.json"
        return {
            "class": MODEL_CLASS,
            "config": dataclasses.asdict(self.model_config()),
            "objective": dataclasses.asdict(self.config.objective),
            "features": "log1p(counts / library_size * 1e4) on the store's genes",
            **store_card(meta, ("cell_type", "batch")),
            "set_size": self.config.data.set_size,
            "store": str(self.store.absolute()),
            "split": json.loads(split_file.read_text()) if split_file.exists() else None,
        }

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        example = np.zeros((2, 8, 2 + self.model_config().n_features), dtype=np.float32)
        return SetImputer(model).eval(), example


class SetImputer(nn.Module):
    """One float array ``(B, S, 2 + G)``: the cell-type code in column 0 and the batch code
    in column 1 of every cell (read only when the model is conditioned on them), then the
    cell's log1p features with masked genes set to 0 -> reconstructed features (B, S, G).
    The MLflow serving form."""

    def __init__(self, model: STPretrainModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(
            packed[:, :, 2:], cell_type=packed[:, 0, 0].long(), batch=packed[:, :, 1].long()
        )
