"""The ST (set transformer) fine-tuning stage: perturbation prediction on a VCC-style store.

    latentcell train st --set data.path=STORE --set split.file=SPLIT.toml --set run.dir=DIR

``prepare_data`` assigns the split (``data_pipelines.perturbation_splits``) once and saves it
in the run (``split.npz`` rows, ``split.json`` summary); training sets come from a
``SetSampler`` restricted to the training rows, so no held-out cell (perturbed or control)
ever reaches the model. Validation sets use the val rows, with the training controls as
inputs where the val split holds no controls of its own (held-out perturbations keep their
controls in training). ``init.run`` starts from a pretraining run's weights (st-pretrain):
tensors load by name, gene and label axes mapped by key (``init_from_run.py``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.perturbation_splits import (
    PerturbationSplit,
    assign_split,
    load_split_config,
)
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
from latentcell.data_pipelines.stores import open_store
from latentcell.inference.model_builders import ST_CLASS, build_st_model  # noqa: F401  (re-export)
from latentcell.inference.predict import _dense, log1p_normalize
from latentcell.inference.vae_bridge import VAEBridge
from latentcell.models.perturbation_encoders import ENCODER_KINDS, PerturbationEncoderConfig
from latentcell.models.set_losses import SetLossConfig
from latentcell.models.st_model import (
    STConfig,
    STModel,
    STShape,
    cell_features,
    check_basal,
    check_space,
    is_exporting,
)

from .config import ConfigError
from .init_from_run import load_from_run, load_matching  # noqa: F401  (load_matching: re-export)
from .sections import OptimConfig, RunSection, TrainConfig, VAERef
from .set_batches import SetBatches, require_sets
from .st_sections import SetDataSection, role_categories, store_card
from .store_stage import CountStoreStage
from .tracking import TrackingConfig

__all__ = ["MODEL_CLASS", "STDataSection", "STModelSection", "STRunConfig", "STStage"]

MODEL_CLASS = ST_CLASS


@dataclass(frozen=True)
class STDataSection(SetDataSection):
    """path: a perturbation store (``latentcell data build --schema vcc``); "" = built-in.
    The other keys: ``SetDataSection``."""


@dataclass(frozen=True)
class SplitSection:
    """file: a split TOML (see ``data_pipelines/perturbation_splits.py``); "" holds out 10%
    of every group's cells for validation."""

    file: str = ""


@dataclass(frozen=True)
class InitSection:
    """run: a finished st-pretrain (or st) run whose matching weights start this one."""

    run: str = ""


@dataclass(frozen=True)
class STModelSection(STShape):
    """The user's choices for ``STConfig`` (the shape keys: ``STShape``); sizes and
    vocabularies come from the store. space "latent" predicts in the latent space of the
    count VAE ``vae.run`` (trained without batch conditioning) and decodes to genes at
    prediction time. basal "train" re-centres every control set on the training controls'
    mean (see ``models/st_model.py``). target_effect (gene space): one learned factor on each
    perturbed gene's own expression, matched by the store's gene symbols, so that an unseen
    but measured target is still knocked down. perturbation_dropout: the share of training
    sets whose perturbation embedding is swapped for a learned generic one, which
    ``latentcell predict --unseen generic`` then gives to perturbations the model has no
    trained embedding for (see ``models/st_model.py``). cell_type_dropout (with cell-type
    conditioning): the share of training sets treated as of an unknown cell type (a learned
    vector instead of their cell-type row), the route ``latentcell predict
    --unseen-cell-type unknown`` gives to cell types without training sets, and validation
    to held-out ones."""

    space: str = "gene"
    basal: str = "set"
    target_effect: bool = False
    perturbation_dropout: float = 0.0
    cell_type_dropout: float = 0.0
    cell_type_conditioning: bool = True
    shift_path: bool = False
    batch_conditioning: bool = False
    perturbation_encoder: str = "onehot"
    embeddings_file: str = ""

    def __post_init__(self) -> None:
        check_space(self.space)
        check_basal(self.basal)
        super().__post_init__()
        if self.perturbation_encoder not in ENCODER_KINDS:
            raise ValueError(f"perturbation_encoder must be one of {ENCODER_KINDS}")
        if self.target_effect and self.space != "gene":
            raise ValueError("target_effect acts on gene expression: it needs space='gene'")
        if not 0.0 <= self.cell_type_dropout < 1.0:
            raise ValueError(f"cell_type_dropout must be in [0, 1), got {self.cell_type_dropout}")
        if self.cell_type_dropout and not self.cell_type_conditioning:
            raise ValueError(
                "cell_type_dropout trains the unknown cell type of cell-type conditioning: "
                "set model.cell_type_conditioning=true, or cell_type_dropout=0"
            )


@dataclass(frozen=True)
class STRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/st"))
    data: STDataSection = field(default_factory=STDataSection)
    split: SplitSection = field(default_factory=SplitSection)
    init: InitSection = field(default_factory=InitSection)
    vae: VAERef = field(default_factory=VAERef)
    model: STModelSection = field(default_factory=STModelSection)
    loss: SetLossConfig = field(default_factory=SetLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


_VOCABULARY_ROLES = ("perturbation", "cell_type", "batch")
DEFAULT_SPLIT = {"split": {"seed": 0, "cells": {"val_fraction": 0.1, "test_fraction": 0.0}}}


class STStage(CountStoreStage):
    name = "st"
    config: STRunConfig

    def __init__(self, config: STRunConfig) -> None:
        super().__init__(config)
        self._split: PerturbationSplit | None = None
        self._model_config: STConfig | None = None
        self._bridge: VAEBridge | None = None

    # -- data (store and meta: CountStoreStage) -----------------------------------------------

    @property
    def split_path(self) -> Path:
        return self.config.run.dir_path / "split.npz"

    @property
    def bridge(self) -> VAEBridge | None:
        """The count VAE between genes and latents (``space="latent"`` only)."""
        if self.config.model.space != "latent":
            return None
        if self._bridge is None:
            if not self.config.vae.run:
                raise ConfigError("model.space=latent needs vae.run (a trained count VAE)")
            bridge = VAEBridge(self.config.vae.run, self.config.vae.weights)
            self._bridge = bridge.check_genes(self.meta.n_genes, self.store)
        return self._bridge

    def prepare_data(self, is_main_process: bool) -> None:
        if not is_main_process:
            return
        self._input.ensure_store()
        self.bridge  # noqa: B018  (a wrong VAE fails here, before anything is written)
        reader = open_store(self.store)
        for role in ("perturbation", "cell_type"):
            if reader.meta.roles.get(role) is None:
                raise DataValidationError(
                    self.store, f"roles.{role}", "the store has no such column",
                    "build it with --schema vcc (or --pert-col / --cell-type-col)",
                )  # fmt: skip
        if self.config.split.file:
            config = load_split_config(self.config.split.file)
        else:
            from latentcell.data_pipelines.perturbation_splits import SplitConfig

            config = SplitConfig.from_dict(DEFAULT_SPLIT, "<default split>")
        split = assign_split(reader, config)
        out = self.config.run.dir_path
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "split.tmp.npz"
        np.savez(tmp, train=split.train, val=split.val, test=split.test)
        tmp.replace(self.split_path)
        (out / "split.json").write_text(split.to_json())
        self._split = split

    def split_rows(self) -> dict[str, np.ndarray]:
        with np.load(self.split_path) as f:
            return {k: f[k] for k in ("train", "val", "test")}

    def control_code(self) -> int:
        """The control label's code in the store's perturbation vocabulary."""
        meta = self.meta
        return meta.categories[meta.roles["perturbation"]].index(meta.control_label)

    def groups_in(self, rows: np.ndarray) -> pd.DataFrame:
        """The store's group index (one row per (cell type, perturbation, batch) range) with
        ``n``: how many of ``rows`` each range holds, and ``perturbed``: a non-control
        range (a range of a set's perturbed cells)."""
        rows = np.sort(rows)
        index = open_store(self.store).group_index()
        start, stop = index["start"].to_numpy(), index["stop"].to_numpy()
        index["n"] = np.searchsorted(rows, stop) - np.searchsorted(rows, start)
        pert = index["perturbation"].to_numpy()
        index["perturbed"] = (pert != self.control_code()) & (pert >= 0)
        return index

    def control_rows(self, rows: np.ndarray) -> np.ndarray:
        """The control cells among ``rows``."""
        control = self.control_code()
        index = open_store(self.store).group_index()
        index = index[index["perturbation"] == control]
        ranges = [np.arange(a, b) for a, b in zip(index["start"], index["stop"], strict=True)]
        all_controls = np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        return np.intersect1d(rows, all_controls)

    def _sampler(self, rows: np.ndarray, rank: int, world_size: int, train: bool) -> SetBatches:
        d = self.config.data
        config = SetSamplerConfig(**d.sampler_options(self.config.train.seed, train))
        sampler = SetSampler(
            partial(open_store, self.store), config, rank=rank, world_size=world_size,
            num_workers=d.num_workers if train else 0, rows=rows,
        )  # fmt: skip
        if train:
            require_sets(sampler, self.store)
        bridge = self.bridge
        transform = None if bridge is None else partial(latent_features, bridge)
        return SetBatches(sampler.loader(), d.sets_per_batch, transform)

    def train_loader(self, rank: int, world_size: int) -> SetBatches:
        return self._sampler(self.split_rows()["train"], rank, world_size, train=True)

    def val_loader(self, rank: int, world_size: int) -> SetBatches | None:
        rows = self.split_rows()
        if len(rows["val"]) == 0:
            return None
        val = rows["val"]
        if len(self.control_rows(val)) == 0:  # zero-shot val: start from training controls
            val = np.union1d(val, self.control_rows(rows["train"]))
        return self._sampler(val, rank, world_size, train=False)

    # -- model --------------------------------------------------------------------------------

    def model_config(self) -> STConfig:
        if self._model_config is None:
            meta, m = self.meta, self.config.model
            cell_types = meta.categories[meta.roles["cell_type"]]
            batch_column = meta.roles.get("batch")
            n_batches = len(meta.categories[batch_column]) if batch_column else 0
            self._model_config = STConfig(
                **m.shape_kwargs(),
                n_features=self.bridge.n_latent if self.bridge else meta.n_genes,
                perturbation_labels=tuple(meta.categories[meta.roles["perturbation"]]),
                space=m.space,
                basal=m.basal,
                n_cell_types=len(cell_types) if m.cell_type_conditioning else 0,
                n_batches=n_batches if m.batch_conditioning else 0,
                target_effect=m.target_effect,
                perturbation_dropout=m.perturbation_dropout,
                cell_type_dropout=m.cell_type_dropout,
                shift_path=m.shift_path,
                basal_cell_types=len(cell_types) if m.basal == "train" else 0,
                feature_genes=tuple(str(g) for g in meta.var["gene_symbol"])
                if m.target_effect
                else (),
                perturbation=PerturbationEncoderConfig(
                    kind=m.perturbation_encoder,
                    dim=m.hidden,
                    embeddings_file=m.embeddings_file,
                    control_label=meta.control_label or "non-targeting",
                ),  # fmt: skip
                loss=self.config.loss,
            )
        return self._model_config

    def build_model(self) -> nn.Module:
        model = STModel(self.model_config())
        if self.config.init.run:
            meta = self.meta
            categories = role_categories(meta, _VOCABULARY_ROLES)
            genes = [str(g) for g in meta.var.index]
            self._init = load_from_run(model, self.config.init.run, genes, categories)
        if model.config.basal == "train":
            model.set_control_mean(self.training_control_mean())
        if model.cell_type is not None:
            model.set_trained_cell_types(torch.from_numpy(self.trained_cell_type_mask()))
        self.check_validation_covariates(model)
        return model

    def init_report(self) -> dict | None:
        """What ``init.run`` loaded (``init_from_run.InitReport``): the loop's optional hook."""
        init = getattr(self, "_init", None)
        return None if init is None else init.to_dict()

    def trained_cell_type_mask(self) -> np.ndarray:
        """(cell types,) bool: the types with at least one perturbed training cell, i.e.
        with training sets: only their cell-type rows are ever trained."""
        meta = self.meta
        index = self.groups_in(self.split_rows()["train"])
        codes = index["cell_type"].to_numpy()[index["perturbed"] & (index["n"] > 0)]
        mask = np.zeros(len(meta.categories[meta.roles["cell_type"]]), dtype=bool)
        mask[codes[codes >= 0]] = True
        return mask

    def trained_cell_types(self) -> list[str]:
        """Names of the cell types with training sets (``trained_cell_type_mask``)."""
        meta = self.meta
        names = meta.categories[meta.roles["cell_type"]]
        return [names[i] for i in np.flatnonzero(self.trained_cell_type_mask())]

    def check_validation_covariates(self, model: STModel) -> None:
        """Validation must not meet untrained rows either. Sets of a cell type without
        training sets (or training controls, for ``basal="train"``) go through the unknown
        cell type (``STModel.forward``); a model that has none is refused here, and so is a
        batch-conditioned one whose validation controls come from batches no training
        control had."""
        meta, rows = self.meta, self.split_rows()
        if len(rows["val"]) == 0:
            return
        val = self.groups_in(rows["val"])
        where = self.config.split.file or self.split_path
        if model.uses_cell_type and not model.takes_unknown:
            known = model.known_cell_types().numpy()
            codes = val["cell_type"].to_numpy()[val["perturbed"] & (val["n"] > 0)]
            missing = sorted({int(t) for t in codes if t >= 0 and not known[t]})
            if missing:
                names = [meta.categories[meta.roles["cell_type"]][t] for t in missing]
                raise DataValidationError(
                    where, "model.cell_type_dropout",
                    f"validation holds cell types {names} that have no training set, so the "
                    "model's cell-type rows for them are never trained",
                    "set model.cell_type_dropout > 0 (e.g. 0.2; validation then uses the "
                    "learned unknown cell type, as `predict --unseen-cell-type unknown` does), "
                    "or model.cell_type_conditioning=false, or train on some of their cells",
                )  # fmt: skip
        if model.batch is not None:
            train = self.groups_in(rows["train"])
            trained = set(train["batch"][~train["perturbed"] & (train["n"] > 0)].tolist())
            controls = val[~val["perturbed"] & (val["n"] > 0)]
            untrained = sorted(set(controls["batch"].tolist()) - trained)
            if untrained:  # (zero-shot validation starts from training controls: none)
                names = [meta.categories[meta.roles["batch"]][b] for b in untrained if b >= 0]
                raise DataValidationError(
                    where, "model.batch_conditioning",
                    f"validation controls come from batches {names} that no training control "
                    "had, so the model's batch rows for them are never trained",
                    "set model.batch_conditioning=false, or keep controls of every batch in "
                    "training",
                )  # fmt: skip

    def training_control_mean(self) -> torch.Tensor:
        """Mean model features of the TRAINING control cells, one row per cell type of the
        store whatever the conditioning (a pooled mean would move every type's controls to
        the average of all types); NaN rows for types without training controls. Reads the
        training controls once: runs of at most 4096 controls, split where a gap of other
        cells is wider than that, so perturbed cells are barely read."""
        meta, config = self.meta, self.model_config()
        rows = self.control_rows(self.split_rows()["train"])
        if len(rows) == 0:
            raise DataValidationError(
                self.store, "training controls",
                f"the split leaves no {meta.control_label!r} cell in training",
                "keep control cells in training, or use model.basal=set",
            )  # fmt: skip
        sums = torch.zeros(config.basal_cell_types, config.n_features, dtype=torch.float64)
        counts = torch.zeros(sums.shape[0], dtype=torch.float64)
        reader = open_store(self.store)
        runs = np.split(rows, np.flatnonzero(np.diff(rows) > 4096) + 1)
        for chunk in (c for run in runs for c in np.array_split(run, -(-len(run) // 4096))):
            block = reader.read_rows(int(chunk[0]), int(chunk[-1]) + 1).take(chunk - chunk[0])
            x = torch.from_numpy(log1p_normalize(_dense(block.X), block.library_size))
            if self.bridge is not None:
                x = self.bridge.encode(x)
            codes = torch.from_numpy(np.asarray(block.codes[meta.roles["cell_type"]], np.int64))
            sums.index_add_(0, codes, x.double())
            counts.index_add_(0, codes, torch.ones(len(chunk), dtype=torch.float64))
        return (sums / counts[:, None]).float()  # NaN where a cell type has no controls

    def trained_perturbations(self) -> list[str]:
        """Perturbation labels with at least one training cell: only their onehot /
        gene_table vectors were ever trained (the predictor refuses the others)."""
        meta = self.meta
        labels = meta.categories[meta.roles["perturbation"]]
        index = self.groups_in(self.split_rows()["train"])
        seen = np.unique(index["perturbation"].to_numpy()[index["n"] > 0])
        return [labels[i] for i in seen]

    def model_card(self) -> dict[str, Any]:
        meta = self.meta
        return {
            "class": MODEL_CLASS,
            "config": dataclasses.asdict(self.model_config()),
            **store_card(meta, _VOCABULARY_ROLES),
            "control_label": meta.control_label,
            "set_size": self.config.data.set_size,
            "vae": self.bridge.provenance if self.bridge else None,
            "store": str(self.store.absolute()),
            "split": json.loads((self.config.run.dir_path / "split.json").read_text()),
            "trained_perturbations": self.trained_perturbations(),
            "trained_cell_types": self.trained_cell_types(),
        }

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        example = np.zeros((2, 8, 2 + self.model_config().n_features), dtype=np.float32)
        known = np.flatnonzero(model.known_cell_types().numpy())
        example[:, :, 1] = known[0] if len(known) else 0
        return SetPredictor(model).eval(), example


def source_index(store: str | Path) -> np.ndarray:
    """Each store row's row in the store's (single) input h5ad (``_source_row``): how a file
    of real cells is cut from the original data. Reads the store's rows once (fine at
    experiment scale; a multi-file store needs ``_source_file`` too)."""
    reader = open_store(store)
    return np.asarray(reader.read_rows(0, reader.meta.n_cells).numeric["_source_row"], np.int64)


def split_source_rows(run_dir: str | Path, store: str | Path) -> dict[str, np.ndarray]:
    """Each split's cells of a run as sorted rows of the store's input h5ad."""
    source = source_index(store)
    with np.load(Path(run_dir) / "split.npz") as f:
        return {k: np.sort(source[f[k]]) for k in ("train", "val", "test")}


def latent_features(bridge: VAEBridge, batch: dict) -> dict:
    """Both sides' VAE latents as the model's ``features`` (log1p counts -> encoder)."""
    for side in ("control", "perturbed"):
        part = batch[side]
        part["features"] = bridge.encode(cell_features(part, "gene"))
    return batch


class SetPredictor(nn.Module):
    """One float array ``(B, S, 2 + F)``: the perturbation code in column 0 and the cell-type
    code in column 1 (the first cell's are used), then the control's features -> predicted
    features (B, S, F). The MLflow serving form. It has no option for the unknown cell type,
    so a set of a cell type without trained parameters is refused (``latentcell predict
    --unseen-cell-type unknown`` and the exported bundle offer that route); the graph MLflow
    saves cannot raise on a value, so there such a set's cells come back NaN."""

    def __init__(self, model: STModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        cell_type = None
        if self.model.uses_cell_type:
            cell_type = packed[:, 0, 1].long()
            untrained = ~self.model.known_cell_types()[cell_type]
            if not is_exporting() and untrained.any():
                raise ValueError(
                    f"cell type codes {sorted(set(cell_type[untrained].tolist()))} had no "
                    "training sets (or training controls): their rows were never trained"
                )
        out = self.model.predict(packed[:, :, 2:], packed[:, 0, 0].long(), cell_type=cell_type)
        if cell_type is not None:  # the exported graph cannot raise: such sets come back NaN
            out = torch.where(untrained[:, None, None], torch.nan, out)
        return out
