"""The config sections every training stage shares: where the run lives, its data, the
optimizer and the loop. A stage composes these with its own model section (see
``vae_stage.VAERunConfig``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from latentcell.data_pipelines.integrity import ON_CORRUPT
from latentcell.data_pipelines.split_choice import SPLIT_BY

from .config import ConfigError

PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


def check_on_corrupt(value: str) -> None:
    if value not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {value!r}")


@dataclass(frozen=True)
class RunSection:
    """dir: this stage's outputs (config.toml, checkpoints/, final/).
    root: where stages of one experiment share an MLflow store and the built-in dataset;
    "" means the parent of ``dir``."""

    dir: str = "runs/vae"
    root: str = ""
    name: str = ""

    @property
    def dir_path(self) -> Path:
        return Path(self.dir)

    @property
    def root_path(self) -> Path:
        return Path(self.root) if self.root else Path(self.dir).resolve().parent


@dataclass(frozen=True)
class DataConfig:
    """path: a store written by ``latentcell data build`` (Zarr or WebDataset); "" uses the
    built-in synthetic dataset, generated once under ``<run root>/builtin_data``.
    val_path: a separate validation store; else ``val_fraction`` of the store is held out
    (0: no validation), chosen by ``split_seed``: split_by "units" holds out whole read units
    (Zarr chunks / shards: fastest), "cells" cells stratified by ``stratify`` (obs columns or
    role names; [] = the store's roles; the DiT adds its model.conditions), "auto" cells when
    the store has under 100 units or a unit split would hold out most of a label
    (``data_pipelines/split_choice.py``). on_corrupt: "error" stops at a damaged unit naming
    its file; "skip" leaves its cells out, prints it and records it in summary.json
    (``data_pipelines.skipping_reader``)."""

    path: str = ""
    val_path: str = ""
    val_fraction: float = 0.05
    split_seed: int = 0
    split_by: str = "auto"
    stratify: tuple[str, ...] = ()
    batch_size: int = 256
    num_workers: int = 0
    buffer_units: int = 8
    on_corrupt: str = "error"

    def __post_init__(self) -> None:
        check_on_corrupt(self.on_corrupt)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.split_by not in SPLIT_BY or self.split_seed < 0:
            raise ValueError(f"split_by must be one of {SPLIT_BY} (got {self.split_by!r}), "
                             f"split_seed >= 0 (got {self.split_seed})")  # fmt: skip
        if len(set(self.stratify)) != len(self.stratify) or not all(self.stratify):
            raise ValueError(f"stratify must name columns once each, got {list(self.stratify)}")
        if self.batch_size < 1 or self.num_workers < 0 or self.buffer_units < 1:
            raise ValueError("batch_size and buffer_units must be >= 1, num_workers >= 0")


@dataclass(frozen=True)
class SplitFileSection:
    """file: a split TOML (``data_pipelines/perturbation_splits.py``), the file ``train st``
    takes. When set, the stage trains on the split's train rows only and validates on its val
    rows (no validation when it has none), instead of the ``data.val_fraction`` split:
    ``data.val_fraction``, ``split_seed``, ``split_by`` and ``stratify`` are then unused, and
    ``data.val_path`` is refused. The rows are those of ``train st`` on the same store and
    file, saved as ``split.npz`` / ``split.json`` in the run, so a VAE later used by an ST run
    (``model.space=latent``) or a baseline (``--baseline latent``) of that split never saw its
    test cells. "" = the ``data.val_fraction`` split."""

    file: str = ""


def check_split_section(config) -> None:
    """``split.file`` replaces the data.val_fraction split; a separate validation store would
    contradict it (every rank checks it, before anything runs)."""
    if config.split.file and config.data.val_path:
        raise ConfigError(
            "split.file and data.val_path both choose the validation cells: with split.file "
            "the split's val rows are used; drop data.val_path (or split.file)"
        )


def split_card(rows_file: Path) -> dict:
    """What a model card records of the run's split: its summary (``split.json`` beside
    ``rows_file``) and the digest of its train rows, which later stages compare with theirs."""
    from latentcell.data_pipelines.perturbation_splits import SPLIT_SUMMARY, read_split_rows
    from latentcell.data_pipelines.row_subset import rows_digest

    summary = json.loads((rows_file.parent / SPLIT_SUMMARY).read_text())
    return {**summary, "train_rows_sha256": rows_digest(read_split_rows(rows_file)["train"])}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay on weight matrices only (not biases, norms,
    per-gene dispersions), linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    The warm-up lasts ``warmup_steps`` but at most ``max_warmup_fraction`` of the run, so a
    short run (``--set train.max_steps=60``) still reaches its peak early and decays, instead
    of ending mid-warm-up; 1.0 lifts the cap."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 100
    max_warmup_fraction: float = 0.1
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.max_warmup_fraction <= 1.0:
            raise ValueError(
                f"max_warmup_fraction must be in (0, 1], got {self.max_warmup_fraction}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop. Steps count optimizer updates (each ``grad_accum_steps`` micro-batches per
    process). ``max_nonfinite``: consecutive micro-batches with a nan/inf loss that are
    skipped before the run stops with an error. ``checkpoint_every`` 0 saves only at the end;
    ``eval_every`` 0 validates only at the end."""

    max_steps: int = 1000
    seed: int = 0
    grad_accum_steps: int = 1
    mixed_precision: str = "auto"
    ema: bool = False
    ema_decay: float = 0.999
    eval_every: int = 250
    eval_batches: int = 0
    checkpoint_every: int = 500
    keep_last: int = 2
    max_nonfinite: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum_steps < 1:
            raise ValueError("max_steps and grad_accum_steps must be >= 1")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if min(self.eval_every, self.eval_batches, self.checkpoint_every) < 0:
            raise ValueError("eval_every, eval_batches and checkpoint_every must be >= 0")
        if self.keep_last < 1 or self.max_nonfinite < 1 or self.seed < 0:
            raise ValueError("keep_last and max_nonfinite must be >= 1, seed >= 0")


@dataclass(frozen=True)
class VAERef:
    """run: the ``run.dir`` of a finished ``latentcell train vae``; weights: auto|ema|model."""

    run: str = ""
    weights: str = "auto"
