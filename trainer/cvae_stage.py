"""The conditional-VAE training stage (``latentcell train cvae``): VAEStage's cells and loop,
a ``ConditionalVAE`` conditioned on the store's roles, and a model card the predictor and
the exporter work from alone.

Cells are the count VAE's (``vae_stage``): with ``split.file`` the split's train rows (the
rows ``train st`` trains on) and its val rows for validation, else ``data.val_fraction`` of
the store. The conditions come from the store: its perturbation role (control label
included) always, its cell-type role with ``model.cell_type_conditioning``, its batch role
with ``model.batch_conditioning``; the loader delivers their codes as ``batch["obs"][role]``.

The card records, beside the class and the resolved config: the genes in store order, each
role's vocabulary, the roles, the control label, the store, the perturbation labels and cell
types that had training cells (``trained_perturbations``, ``trained_cell_types``: the
predictor refuses the others, whose one-hot weights were never trained), the most frequent
training batch (``default_batch``: the batch predictions are made in, since control files
carry no batch the run knows) and the split.

Default recipe (``CVAERunConfig()``): 2,000 steps of 256 cells, 10 latents, 128 hidden units,
one layer, KL warm-up over 400 steps, lr 1e-3 (cosine). Measured on a Papalexi-sized synthetic
store (20,000 cells x 300 genes, 25 perturbations, split 70/10/20, on 2 shared CPU cores): 3,000
steps took 6 min at 2,100 cells/s, and validation loss moved 239.40 -> 239.26 from step 2,000
to 3,000 (242.96 at 500); Mode B's mean shift per held-out perturbation against the true one
(Pearson over genes, averaged) was 0.952 (decoder mean) / 0.971 (sampled cells) at 2,000 steps
against 0.955 / 0.976 at 3,000. So 2,000 steps: about 4 minutes at that speed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.perturbation_splits import read_split_rows
from latentcell.data_pipelines.stores import open_store
from latentcell.models.count_vae import CountVAEConfig
from latentcell.models.cvae import (
    CONDITION_ROLES,
    DEFAULT_LIKELIHOOD,
    MODEL_CLASS,
    ConditionalVAE,
    conditioned_roles,
    cvae_config,
)

from . import val_split
from .sections import (
    DataConfig,
    OptimConfig,
    RunSection,
    SplitFileSection,
    TrainConfig,
    split_card,
)
from .st_sections import store_card
from .tracking import TrackingConfig
from .vae_stage import VAEModelSection, VAEStage

__all__ = ["MODEL_CLASS", "CVAEModelSection", "CVAERunConfig", "CVAEServing", "CVAEStage"]

# ~26 epochs of a 20,000-cell store at batch 256 (see the module docstring for the measurement)
DEFAULT_STEPS = 2000


@dataclass(frozen=True)
class CVAEModelSection:
    """The user's choices; sizes come from the store. ``cell_type_conditioning`` /
    ``batch_conditioning``: add the store's cell-type / batch role to the conditions (when it
    has the role). Batch is off by default: a prediction then needs no batch; with it on,
    predictions use the most frequent training batch. ``likelihood``: see ``models/cvae.py``
    for why NB is the default."""

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    likelihood: str = DEFAULT_LIKELIHOOD
    dropout: float = 0.1
    cell_type_conditioning: bool = True
    batch_conditioning: bool = False
    kl_warmup_steps: int = 400

    def __post_init__(self) -> None:
        VAEModelSection.__post_init__(self)  # the same sizes and likelihoods as the count VAE


@dataclass(frozen=True)
class CVAERunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/cvae"))
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitFileSection = field(default_factory=SplitFileSection)
    model: CVAEModelSection = field(default_factory=CVAEModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=DEFAULT_STEPS))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class CVAEStage(VAEStage):
    name = "cvae"
    config: CVAERunConfig

    def prepare_data(self, is_main_process: bool) -> None:
        if is_main_process:
            self._input.ensure_store()
            meta = self.meta
            if meta.roles.get("perturbation") is None or meta.control_label is None:
                raise DataValidationError(
                    self.store, "roles.perturbation",
                    "the store has no perturbation column or control label, and the CVAE "
                    "conditions on it", "build it with --schema vcc (or --pert-col / --control)",
                )  # fmt: skip
        super().prepare_data(is_main_process)

    def _vocabulary(self, role: str) -> list[str]:
        column = self.meta.roles.get(role)
        return list(self.meta.categories[column]) if column else []

    def model_config(self) -> CountVAEConfig:
        if self._model_config is None:
            m = self.config.model
            self._model_config = cvae_config(
                self.meta.n_genes,
                len(self._vocabulary("perturbation")),
                len(self._vocabulary("cell_type")) if m.cell_type_conditioning else 0,
                len(self._vocabulary("batch")) if m.batch_conditioning else 0,
                n_latent=m.n_latent, n_hidden=m.n_hidden, n_layers=m.n_layers,
                likelihood=m.likelihood, dropout=m.dropout, kl_warmup_steps=m.kl_warmup_steps,
            )  # fmt: skip
        return self._model_config

    def build_model(self) -> nn.Module:
        return ConditionalVAE(self.model_config())

    def training_groups(self) -> pd.DataFrame:
        """The store's group index (one row per (cell type, perturbation, batch) range of
        codes) with ``n``: its training cells (the split's train rows; without
        ``split.file``, every cell of the store)."""
        index = open_store(self.store).group_index()
        start, stop = index["start"].to_numpy(), index["stop"].to_numpy()
        if self.config.split.file:
            rows = np.sort(read_split_rows(self.split_path)["train"])
            index["n"] = np.searchsorted(rows, stop) - np.searchsorted(rows, start)
        else:
            index["n"] = stop - start
        return index

    def _trained(self, role: str, groups: pd.DataFrame) -> list[str]:
        names = self._vocabulary(role)
        counts = groups[groups[role] >= 0].groupby(role)["n"].sum()
        return [names[int(code)] for code, n in counts.items() if n > 0]

    def model_card(self) -> dict[str, Any]:
        meta, groups = self.meta, self.training_groups()
        config = dataclasses.asdict(self.model_config())
        config["covariate_keys"] = list(config["covariate_keys"])
        config["n_covariate_categories"] = list(config["n_covariate_categories"])
        batches = groups[groups["batch"] >= 0].groupby("batch")["n"].sum()
        default_batch = None
        if len(batches) and self.meta.roles.get("batch"):
            default_batch = self._vocabulary("batch")[int(batches.idxmax())]
        card = {
            "class": MODEL_CLASS,
            "config": config,
            **store_card(meta, CONDITION_ROLES),
            "control_label": meta.control_label,
            "conditions": list(conditioned_roles(self.model_config())),
            "store": str(self.store.absolute()),
            "trained_perturbations": self._trained("perturbation", groups),
            "trained_cell_types": self._trained("cell_type", groups),
            "default_batch": default_batch,
        }
        if self.config.split.file:
            card["split"] = split_card(self.split_path)
        elif val_split.used(self.config):
            card["validation_split"] = val_split.read_record(self.config.run.dir_path)
        return card

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        serving = CVAEServing(model, self.meta.categories[self.meta.roles["perturbation"]]
                              .index(self.meta.control_label))  # fmt: skip
        example = np.zeros((2, len(serving.roles) + self.model_config().n_genes), np.float32)
        example[:, len(serving.roles) : len(serving.roles) + 10] = 1.0
        return serving.eval(), example


class CVAEServing(nn.Module):
    """The MLflow serving form, Mode B on one float array ``(n, k + G)``: the target
    perturbation code in column 0, then the cell's code of each further condition role
    (cell type, batch, in ``CONDITION_ROLES`` order), then its counts -> mean log1p
    expression (n, G) of the cell re-decoded under the perturbation."""

    def __init__(self, model: ConditionalVAE, control_code: int) -> None:
        super().__init__()
        self.model, self.control_code, self.roles = model, control_code, model.roles

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        k = len(self.roles)
        counts = packed[:, k:]
        codes = {r: packed[:, i].long() for i, r in enumerate(self.roles)}
        source = {
            **codes,
            "perturbation": torch.full_like(codes["perturbation"], self.control_code),
        }
        params = self.model.transfer(counts, counts.sum(-1), source, codes)
        return self.model.mean_log1p(params)
