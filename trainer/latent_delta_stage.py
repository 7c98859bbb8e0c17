"""The perturbation latent-diffusion stage (``latentcell train latent-delta``): VAE latents of
paired control and perturbed cells, then the delta predictor and the conditional DiT of
``models/latent_delta.py`` trained together in the shared loop.

    latentcell train latent-delta --set data.path=STORE --set vae.run=VAE_RUN \\
        [--set split.file=SPLIT.toml] [--set model.target=absolute] [--set model.pairing=ot]

``prepare_data`` (main process):

1. The split's train and val rows (``split.file``; without one 10% of every group is held out
   for validation, as ``train st`` does), read into memory as log1p expression
   (``latent_shift_cells.TrainingCells``: the family is for stores that fit in memory;
   ``data.max_cells`` caps the training cells read) and encoded by the VAE ``vae.run``
   (posterior means).
2. Pairing: the cells are unpaired, so each perturbed cell gets a control of its (cell type,
   batch), else of its cell type, by ``model.pairing`` (``latent_shift_cells.pair_cells``):
   ``random`` draws one uniformly (the set sampler's matching rule), ``ot`` matches the
   cells of each (perturbation, cell type, batch) to as many controls by optimal transport in
   the latent. The default is measured (``benchmarks/results/latent_delta/``): see the
   README section "Perturbation latent diffusion".
3. The pairs (z_control, z_perturbed, perturbation code) of the train and val rows, and the
   statistics the model standardizes with (from training pairs only), saved in
   ``<run.dir>/pairs.npz``; a resumed run reuses them when the store, split, VAE weights
   and pairing are unchanged (``fingerprint``), so it continues on the very same pairs.

Every rank then streams its share of the pairs (``pair_batches.PairBatches``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_delta import MODEL_CLASS, TARGETS, LatentDelta, LatentDeltaConfig

from .pair_batches import PairBatches
from .sections import OptimConfig, RunSection, SplitFileSection, TrainConfig, VAERef, split_card
from .store_stage import CountStoreStage
from .tracking import TrackingConfig

__all__ = ["MODEL_CLASS", "LatentDeltaRunConfig", "LatentDeltaStage"]

PAIRINGS = ("random", "ot")
PAIRS_FILE = "pairs.npz"
DEFAULT_SPLIT = {"split": {"seed": 0, "cells": {"val_fraction": 0.1, "test_fraction": 0.0}}}
ENCODE_ROWS = 4096  # cells encoded per VAE call (bounds the dense input's memory)


@dataclass(frozen=True)
class LatentDeltaDataSection:
    """path: a perturbation store ("" = the built-in one). batch_size: pairs per step per
    process. max_cells: a seeded cap on the training cells read (0 = all)."""

    path: str = ""
    batch_size: int = 256
    max_cells: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_cells < 0:
            raise ValueError("batch_size >= 1, max_cells >= 0")


@dataclass(frozen=True)
class LatentDeltaModelSection:
    """target: delta (the DiT and the predictor model z_p - z_c, seed 000) or absolute (z_p
    itself, seed 001). pairing: ot | random (module docstring); ot_max: cells per OT block.
    predictor_hidden / embedding_dim: the delta predictor's MLP and perturbation embedding.
    hidden, depth, heads, patch_size: the DiT (patch 4: a 16-dim latent is 4 tokens, as
    ``train dit`` has it; patch 1 ran at a quarter of the speed). cfg_dropout: how often the perturbation is
    dropped in training (classifier-free guidance). sample_steps / guidance: the defaults of
    ``predict --mode sampled``."""

    target: str = "delta"
    pairing: str = "ot"
    ot_max: int = 512
    predictor_hidden: tuple[int, ...] = (256, 256)
    embedding_dim: int = 32
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    cfg_dropout: float = 0.1
    objective: str = "ddpm"
    prediction: str = "v"
    schedule: str = "cosine"
    sample_steps: int = 50
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.ot_max < 2:
            raise ValueError("ot_max must be >= 2")
        self.diffusion()  # the diffusion keys fail here, naming themselves
        LatentDeltaConfig(1, 1, self.target, self.predictor_hidden, self.embedding_dim,
                          self.dit(1), self.diffusion(), self.cfg_dropout)  # fmt: skip

    def dit(self, n_latent: int) -> DiTConfig:
        return DiTConfig(n_latent=n_latent, patch_size=self.patch_size, hidden=self.hidden,
                         depth=self.depth, heads=self.heads)  # fmt: skip

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(objective=self.objective, prediction=self.prediction,
                               schedule=self.schedule, sample_steps=self.sample_steps,
                               guidance=self.guidance)  # fmt: skip


@dataclass(frozen=True)
class LatentDeltaRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/latent-delta"))
    data: LatentDeltaDataSection = field(default_factory=LatentDeltaDataSection)
    split: SplitFileSection = field(default_factory=SplitFileSection)
    vae: VAERef = field(default_factory=VAERef)
    model: LatentDeltaModelSection = field(default_factory=LatentDeltaModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=3000))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class LatentDeltaStage(CountStoreStage):
    name = "latent-delta"
    config: LatentDeltaRunConfig

    def __init__(self, config: LatentDeltaRunConfig) -> None:
        super().__init__(config)
        self._pairs: dict[str, np.ndarray] | None = None
        self._bridge = None

    @property
    def pairs_path(self) -> Path:
        return self.config.run.dir_path / PAIRS_FILE

    @property
    def split_path(self) -> Path:
        return self.config.run.dir_path / "split.npz"

    def bridge(self):
        """The count VAE of ``vae.run``, checked against the store's genes."""
        from latentcell.inference.vae_bridge import VAEBridge

        if self._bridge is None:
            if not self.config.vae.run:
                raise DataValidationError(
                    "latentcell train latent-delta", "vae.run", "the family works in a count "
                    "VAE's latent space and none was given", "pass --set vae.run=VAE_RUN_DIR "
                    "(a finished latentcell train vae on this store)",
                )  # fmt: skip
            bridge = VAEBridge(self.config.vae.run, self.config.vae.weights)
            self._bridge = bridge.check_genes(self.meta.n_genes, self.store)
        return self._bridge

    # -- data -----------------------------------------------------------------------------

    def prepare_data(self, is_main_process: bool) -> None:
        if not is_main_process:
            return
        self._input.ensure_store()
        meta = self.meta
        if not meta.roles.get("perturbation") or meta.control_label is None:
            raise DataValidationError(
                self.store, "roles.perturbation", "the store has no perturbation column with a "
                "control label", "build it with latentcell data build --schema vcc",
            )  # fmt: skip
        bridge = self.bridge()
        out = self.config.run.dir_path
        out.mkdir(parents=True, exist_ok=True)
        split = self._split()
        fingerprint = self.fingerprint(split, bridge.provenance["weights_sha256"])
        if self.pairs_path.exists():
            with np.load(self.pairs_path, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fingerprint:
                    return  # a resumed run: the same pairs
        pairs = self._make_pairs(split, bridge)
        pairs["fingerprint"] = np.asarray(fingerprint)
        tmp = out / f".{PAIRS_FILE}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **pairs)
        tmp.replace(self.pairs_path)

    def _split(self):
        from latentcell.data_pipelines.perturbation_splits import (
            SplitConfig,
            assign_split,
            load_split_config,
            save_split,
        )
        from latentcell.data_pipelines.split_files import open_count_store

        if self.config.split.file:
            split_config = load_split_config(self.config.split.file)
        else:
            split_config = SplitConfig.from_dict(DEFAULT_SPLIT, "<default split>")
        split = assign_split(open_count_store(self.store, "data.path"), split_config)
        save_split(split, self.config.run.dir_path)
        return split

    def fingerprint(self, split, vae_sha: str) -> str:
        """What the pairs depend on: the store, the rows, the VAE weights, the pairing."""
        m, d = self.config.model, self.config.data
        h = hashlib.sha256()
        for part in (str(self.store.absolute()), vae_sha, m.pairing, str(m.ot_max),
                     str(d.max_cells), str(self.config.train.seed)):  # fmt: skip
            h.update(part.encode() + b"\0")
        for rows in (split.train, split.val):
            h.update(np.ascontiguousarray(rows, np.int64).tobytes() + b"\0")
        return h.hexdigest()

    def _make_pairs(self, split, bridge) -> dict[str, np.ndarray]:
        from latentcell.data_pipelines.split_files import open_count_store

        from .latent_shift_cells import TrainingCells

        rng = np.random.default_rng(self.config.train.seed)
        train_rows = np.asarray(split.train, np.int64)
        cap = self.config.data.max_cells
        if cap and len(train_rows) > cap:
            train_rows = np.sort(rng.choice(train_rows, cap, replace=False))
        reader = open_count_store(self.store, "data.path")
        cells = TrainingCells(reader, np.union1d(train_rows, split.val))
        z = np.concatenate([bridge.encode_numpy(cells.x[i : i + ENCODE_ROWS])
                            for i in range(0, len(cells.x), ENCODE_ROWS)])  # fmt: skip
        is_train = np.isin(cells.rows, train_rows)
        labels = self.meta.categories[self.meta.roles["perturbation"]]
        code = {label: i for i, label in enumerate(labels)}
        out: dict[str, np.ndarray] = {}
        model = self.config.model
        for part, perturbed in (("train", is_train), ("val", ~is_train)):
            # a part's perturbed cells, with every control of the cells read to pair them with
            # (validation perturbed cells may meet training controls, never the reverse)
            usable = perturbed | (cells.is_control & (is_train if part == "train" else True))
            rows = np.flatnonzero(usable)
            p, c, unpaired = cells.pairs(z, rows, model, rng)
            out[f"{part}_z_control"] = z[c].astype(np.float32)
            out[f"{part}_z_perturbed"] = z[p].astype(np.float32)
            out[f"{part}_perturbation"] = np.asarray([code[x] for x in cells.pert[p]], np.int64)
            out[f"{part}_unpaired"] = np.asarray(unpaired)
        if not len(out["train_perturbation"]):
            raise DataValidationError(
                self.store, "training cells", "no perturbed training cell has a control of its "
                "cell type", "keep control cells of every cell type in training",
            )  # fmt: skip
        zc, zp = out["train_z_control"], out["train_z_perturbed"]
        target = zp - zc if model.target == "delta" else zp
        out["control_mean"], out["control_std"] = zc.mean(0), np.maximum(zc.std(0), 1e-6)
        out["target_shift"] = target.mean(0)
        out["target_scale"] = np.asarray(1.0 / max(float((target - target.mean(0)).std()), 1e-6))
        return out

    @property
    def pairs(self) -> dict[str, np.ndarray]:
        if self._pairs is None:
            with np.load(self.pairs_path, allow_pickle=False) as f:
                self._pairs = {k: f[k] for k in f.files}
        return self._pairs

    def _loader(self, part: str, rank: int, world_size: int, train: bool) -> PairBatches:
        p = self.pairs
        arrays = {
            "z_control": p[f"{part}_z_control"],
            "z_perturbed": p[f"{part}_z_perturbed"],
            "perturbation": p[f"{part}_perturbation"],
        }
        return PairBatches(arrays, self.config.data.batch_size, rank, world_size,
                           seed=self.config.train.seed, shuffle=train)  # fmt: skip

    def train_loader(self, rank: int, world_size: int) -> PairBatches:
        return self._loader("train", rank, world_size, True)

    def val_loader(self, rank: int, world_size: int) -> PairBatches | None:
        if not len(self.pairs["val_perturbation"]):
            return None
        return self._loader("val", rank, world_size, False)

    # -- model ----------------------------------------------------------------------------

    def model_config(self) -> LatentDeltaConfig:
        m = self.config.model
        d = int(self.pairs["train_z_control"].shape[1])
        n_perturbations = len(self.meta.categories[self.meta.roles["perturbation"]])
        return LatentDeltaConfig(d, n_perturbations, m.target, m.predictor_hidden,
                                 m.embedding_dim, m.dit(d), m.diffusion(), m.cfg_dropout)  # fmt: skip

    def build_model(self) -> nn.Module:
        model = LatentDelta(self.model_config())
        p = self.pairs
        model.set_stats(torch.from_numpy(p["control_mean"]), torch.from_numpy(p["control_std"]),
                        torch.from_numpy(p["target_shift"]), float(p["target_scale"]))  # fmt: skip
        return model

    def trained_perturbations(self) -> list[str]:
        labels = self.meta.categories[self.meta.roles["perturbation"]]
        codes = np.unique(self.pairs["train_perturbation"])
        return [labels[int(c)] for c in codes]

    def model_card(self) -> dict[str, Any]:
        from .st_sections import store_card

        meta, p = self.meta, self.pairs
        config = dataclasses.asdict(self.model_config())
        card = {
            "class": MODEL_CLASS,
            "config": config,
            **store_card(meta, ("perturbation", "cell_type", "batch")),
            "control_label": meta.control_label,
            "store": str(self.store.absolute()),
            "trained_perturbations": self.trained_perturbations(),
            "vae": self.bridge().provenance,
            "pairing": {
                "rule": self.config.model.pairing,
                "ot_max": self.config.model.ot_max,
                "train_pairs": int(len(p["train_perturbation"])),
                "val_pairs": int(len(p["val_perturbation"])),
                "unpaired": int(p["train_unpaired"]),
            },
            "split": split_card(self.split_path),
        }
        return json.loads(json.dumps(card))  # tuples -> lists, as the card is read back

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        d = int(self.pairs["train_z_control"].shape[1])
        example = np.zeros((2, 1 + d), np.float32)
        code = np.unique(self.pairs["train_perturbation"])[0]
        example[:, 0] = code
        return LatentDeltaServing(model).eval(), example


class LatentDeltaServing(nn.Module):
    """The MLflow serving form, the deterministic mode on one float array ``(n, 1 + d)``: the
    perturbation code in column 0, then the control's latent -> the predicted perturbed
    latent (n, d). Whole-cell prediction (encode, sample, decode) is ``predict --run`` or the
    ONNX bundle."""

    def __init__(self, model: LatentDelta) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        z_control = packed[:, 1:]
        x = self.model.predict_mean(z_control, packed[:, 0].long())
        return self.model.latent_of(z_control, x)
