"""The conditional discrete-diffusion stages (seed 002; ``models/masked_diffusion.py``).

    latentcell train masked-diffusion-pretrain --set data.path=OBS_STORE --set run.dir=PRE
    latentcell train masked-diffusion --set data.path=VCC_STORE --set split.file=SPLIT.toml \\
        --set init.run=PRE --set run.dir=DIR

Fine-tuning (``masked-diffusion``) is the ST stage's data path: the split assigned once and
saved, training (control set, perturbed set) pairs from the set sampler on the training rows
only, validation on the val rows (``st_stage.STStage``, whose data methods this stage
inherits). Pretraining (``masked-diffusion-pretrain``) is st-pretrain's: sets of one
(cell type, sample) group of an observational store, whole groups held out.

Before the first step the main process reads (at most ``masking.statistics_cells``) training
cells once and saves ``statistics.npz`` in the run:

- the bin edges (``models/expression_bins.py``): fitted on these cells, or, with
  ``init.run``, the pretraining run's own (its bin embeddings mean those levels);
- per perturbation (fine-tuning): its log2 fold-change vector against the training controls
  of the same cell type (log1p means / ln 2, averaged over the cell types it was measured
  in); its norm is the perturbation's magnitude input;
- the adaptive mask weights: w_g = clip((r_g / mean r) ** masking.adaptive, 1 / max_weight,
  max_weight), r_g = the mean |log2 fold change| of gene g over the training perturbations.
  ``masking.adaptive=0`` is uniform masking (the ablation). Pretraining masks uniformly:
  there is no perturbation to respond to, and fine-tuning sets its own weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import open_store
from latentcell.inference.predict import _dense, log1p_normalize
from latentcell.models.expression_bins import fit_bin_edges
from latentcell.models.masked_diffusion import (
    MODEL_CLASS,
    PRETRAIN_CLASS,
    MaskedDiffusion,
    MaskedDiffusionConfig,
    MaskedDiffusionPretrain,
    MaskedDiffusionShape,
)
from latentcell.models.perturbation_labels import split_genes

from .init_from_run import load_from_run
from .sections import OptimConfig, RunSection, TrainConfig
from .st_pretrain_stage import STPretrainDataSection, STPretrainStage
from .st_sections import SetDataSection, role_categories, store_card
from .st_stage import InitSection, SplitSection, STStage
from .tracking import TrackingConfig

__all__ = [
    "MaskedDiffusionPretrainRunConfig",
    "MaskedDiffusionPretrainStage",
    "MaskedDiffusionRunConfig",
    "MaskedDiffusionStage",
    "MaskingSection",
]

_LN2 = float(np.log(2.0))
_READ_RUN = 4096  # rows per read when scanning training cells


@dataclass(frozen=True)
class MaskingSection:
    """adaptive: exponent of the per-gene mask weights (0 = uniform masking; see the module
    docstring); max_weight: their clip; statistics_cells: training cells read for the bins
    and the fold changes (a seeded sample when there are more)."""

    adaptive: float = 1.0
    max_weight: float = 4.0
    statistics_cells: int = 50_000

    def __post_init__(self) -> None:
        if not (np.isfinite(self.adaptive) and self.adaptive >= 0):
            raise ValueError(f"adaptive must be finite and >= 0, got {self.adaptive}")
        if not self.max_weight >= 1.0:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")
        if self.statistics_cells < 100:
            raise ValueError(f"statistics_cells must be >= 100, got {self.statistics_cells}")


@dataclass(frozen=True)
class MaskedDiffusionModelSection(MaskedDiffusionShape):
    """``MaskedDiffusionShape``'s keys (the same in pretraining and fine-tuning)."""


def _set_data(**defaults):
    return field(default_factory=lambda: SetDataSection(**defaults))


@dataclass(frozen=True)
class MaskedDiffusionRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/masked-diffusion"))
    data: SetDataSection = _set_data(set_size=32, sets_per_batch=4)
    split: SplitSection = field(default_factory=SplitSection)
    init: InitSection = field(default_factory=InitSection)
    model: MaskedDiffusionModelSection = field(default_factory=MaskedDiffusionModelSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True)
class MaskedDiffusionPretrainRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/masked-diffusion-pre"))
    data: STPretrainDataSection = field(
        default_factory=lambda: STPretrainDataSection(set_size=64, sets_per_batch=4)
    )
    model: MaskedDiffusionModelSection = field(default_factory=MaskedDiffusionModelSection)
    masking: MaskingSection = field(default_factory=lambda: MaskingSection(adaptive=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# -- statistics of the training cells ---------------------------------------------------------


def _sampled_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    rows = np.sort(np.asarray(rows, np.int64))
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def _blocks(reader, rows: np.ndarray):
    """(log1p (n, G) float32, block) for ``rows`` (sorted), read as contiguous ranges."""
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > _READ_RUN) + 1)
    for run in runs:
        for chunk in np.array_split(run, max(1, -(-len(run) // _READ_RUN))):
            if len(chunk) == 0:
                continue
            block = reader.read_rows(int(chunk[0]), int(chunk[-1]) + 1).take(chunk - chunk[0])
            yield log1p_normalize(_dense(block.X), block.library_size), block


def _nonzero_sample(values: list[np.ndarray], limit: int, seed: int) -> np.ndarray:
    flat = np.concatenate(values) if values else np.zeros(0, np.float32)
    if len(flat) > limit:
        flat = np.random.default_rng(seed).choice(flat, limit, replace=False)
    return flat


def fit_edges(stage, rows: np.ndarray, n_bins: int, source) -> np.ndarray:
    """Bin edges from (a sample of) the training rows' nonzero log1p values."""
    m = stage.config.masking
    reader = open_store(stage.store)
    values = []
    for x, _ in _blocks(reader, _sampled_rows(rows, m.statistics_cells, stage.config.train.seed)):
        values.append(x[x > 0])
    try:
        return fit_bin_edges(_nonzero_sample(values, 2_000_000, 0), n_bins)
    except ValueError as err:
        raise DataValidationError(
            source, "counts", f"the training cells have {err}", "train on a store with counts"
        ) from err


def fold_changes(stage, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log2 fold changes (labels, G), trained (labels,) bool): each perturbation's mean
    log1p against the training controls of the same cell type, / ln 2, averaged over its
    cell types weighted by its cells; zero rows for the control and unseen labels."""
    meta = stage.meta
    pert_col, type_col = meta.roles["perturbation"], meta.roles.get("cell_type")
    n_labels = len(meta.categories[pert_col])
    n_types = len(meta.categories[type_col]) if type_col else 1
    sums = np.zeros((n_labels, n_types, meta.n_genes))
    counts = np.zeros((n_labels, n_types))
    reader = open_store(stage.store)
    for x, block in _blocks(reader, _sampled_rows(rows, stage.config.masking.statistics_cells,
                                                  stage.config.train.seed)):  # fmt: skip
        pert = np.asarray(block.codes[pert_col], np.int64)
        types = np.asarray(block.codes[type_col], np.int64) if type_col else np.zeros_like(pert)
        ok = (pert >= 0) & (types >= 0)
        np.add.at(sums, (pert[ok], types[ok]), x[ok])
        np.add.at(counts, (pert[ok], types[ok]), 1.0)
    control = stage.control_code()
    means = sums / np.maximum(counts, 1.0)[..., None]
    has_control = counts[control] > 0
    weight = counts * has_control[None]
    weight[control] = 0.0
    delta = (means - means[control][None]) / _LN2
    total = weight.sum(1)
    fold = (delta * weight[..., None]).sum(1) / np.maximum(total, 1.0)[:, None]
    return fold.astype(np.float32), total > 0


def mask_weights(fold: np.ndarray, trained: np.ndarray, masking: MaskingSection) -> np.ndarray:
    """Per-gene mask weights from the fold changes (module docstring); ones when uniform."""
    n_genes = fold.shape[1]
    if masking.adaptive == 0 or not trained.any():
        return np.ones(n_genes, np.float32)
    response = np.abs(fold[trained]).mean(0)
    ratio = response / max(float(response.mean()), 1e-12)
    with np.errstate(divide="ignore"):
        w = np.power(ratio, masking.adaptive)
    return np.clip(w, 1.0 / masking.max_weight, masking.max_weight).astype(np.float32)


def target_positions(labels: list[str], symbols: list[str], control: str) -> tuple:
    """Per label, the positions of its target genes among the store's gene symbols."""
    where = {s.upper(): i for i, s in enumerate(symbols)}
    out = []
    for label in labels:
        genes = split_genes(label, "+", control)
        out.append(tuple(sorted({where[g.upper()] for g in genes if g.upper() in where})))
    return tuple(out)


def init_edges(init_run: str, n_bins: int, source) -> np.ndarray:
    """The bin edges of the run ``init.run`` names (its tokens mean those levels)."""
    from latentcell.inference.run_cards import load_model_card

    card = load_model_card(init_run)
    if card.get("class") not in MaskedDiffusion.INIT_CLASSES:
        raise DataValidationError(
            source, "class", f"a {card.get('class')} run cannot start a masked-diffusion model",
            "init.run takes a masked-diffusion-pretrain or masked-diffusion run",
        )  # fmt: skip
    edges = (card.get("bins") or {}).get("edges")
    if edges is None or len(edges) != n_bins:
        raise DataValidationError(
            source, "init.run", f"{init_run} has no masked-diffusion bins of n_bins={n_bins}",
            "start from a masked-diffusion(-pretrain) run with the same model.n_bins",
        )  # fmt: skip
    return np.asarray(edges, np.float32)


def save_statistics(path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


# -- the stages -------------------------------------------------------------------------------


class MaskedDiffusionStage(STStage):
    """Fine-tuning on (control set, perturbed set) pairs; the data path is ``STStage``'s."""

    name = "masked-diffusion"
    config: MaskedDiffusionRunConfig

    @property
    def bridge(self):  # gene space only: no count VAE
        return None

    @property
    def statistics_path(self):
        return self.config.run.dir_path / "statistics.npz"

    def prepare_data(self, is_main_process: bool) -> None:
        super().prepare_data(is_main_process)
        if not is_main_process:
            return
        train = self.split_rows()["train"]
        m, source = self.config.model, self.config.split.file or self.store
        if self.config.init.run:
            edges = init_edges(self.config.init.run, m.n_bins, self.config.init.run)
        else:
            edges = fit_edges(self, train, m.n_bins, source)
        fold, trained = fold_changes(self, train)
        weights = mask_weights(fold, trained, self.config.masking)
        save_statistics(self.statistics_path, edges=edges, fold=fold, trained=trained,
                        mask_weight=weights)  # fmt: skip

    def statistics(self) -> dict[str, np.ndarray]:
        with np.load(self.statistics_path) as f:
            return {k: f[k] for k in f.files}

    def model_config(self) -> MaskedDiffusionConfig:
        if self._model_config is None:
            meta = self.meta
            labels = list(meta.categories[meta.roles["perturbation"]])
            symbols = [str(g) for g in meta.var["gene_symbol"]]
            self._model_config = MaskedDiffusionConfig(
                **self.config.model.shape_kwargs(),
                n_genes=meta.n_genes,
                perturbation_labels=tuple(labels),
                target_genes=target_positions(labels, symbols, meta.control_label or ""),
            )
        return self._model_config

    def build_model(self) -> nn.Module:
        model = MaskedDiffusion(self.model_config())
        if self.config.init.run:
            meta = self.meta
            categories = role_categories(meta, ("perturbation", "cell_type", "batch"))
            genes = [str(g) for g in meta.var.index]
            self._init = load_from_run(model, self.config.init.run, genes, categories)
        s = self.statistics()
        model.set_statistics(s["edges"], s["mask_weight"], np.linalg.norm(s["fold"], axis=1))
        return model

    def model_card(self) -> dict[str, Any]:
        meta, s = self.meta, self.statistics()
        labels = meta.categories[meta.roles["perturbation"]]
        return {
            "class": MODEL_CLASS,
            "config": dataclasses.asdict(self.model_config()),
            **store_card(meta, ("perturbation", "cell_type", "batch")),
            "control_label": meta.control_label,
            "set_size": self.config.data.set_size,
            "store": str(self.store.absolute()),
            "split": json.loads((self.config.run.dir_path / "split.json").read_text()),
            "trained_perturbations": self.trained_perturbations(),
            "trained_cell_types": self.trained_cell_types(),
            "bins": {
                "edges": [float(e) for e in s["edges"]],
                "from": self.config.init.run or "training cells",
            },
            "masking": {
                **dataclasses.asdict(self.config.masking),
                "weight_range": [float(s["mask_weight"].min()), float(s["mask_weight"].max())],
            },
            "magnitude": {
                label: round(float(v), 4)
                for label, v in zip(labels, np.linalg.norm(s["fold"], axis=1), strict=True)
            },
        }

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        g = self.model_config().n_genes
        example = np.zeros((2, 4, 1 + 2 * g), dtype=np.float32)
        example[:, :, 1 + g :] = self.model_config().n_bins  # all MASK
        codes = [self.meta.categories[self.meta.roles["perturbation"]].index(p)
                 for p in self.trained_perturbations()]  # fmt: skip
        example[:, :, 0] = codes[0] if codes else 0
        return DenoiserServing(model).eval(), example


class MaskedDiffusionPretrainStage(STPretrainStage):
    """Pretraining on observational group sets; the data path is ``STPretrainStage``'s."""

    name = "masked-diffusion-pretrain"
    config: MaskedDiffusionPretrainRunConfig

    @property
    def statistics_path(self):
        return self.config.run.dir_path / "statistics.npz"

    def train_rows(self) -> np.ndarray:
        """The rows of the training groups."""
        index = open_store(self.store).group_index()
        keys = set(self.split().train)
        codes = index[["cell_type", "perturbation", "batch"]].to_numpy(np.int64)
        chosen = [tuple(int(c) for c in row) in keys for row in codes]
        ranges = index[chosen]
        rows = [np.arange(a, b) for a, b in zip(ranges["start"], ranges["stop"], strict=True)]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def prepare_data(self, is_main_process: bool) -> None:
        super().prepare_data(is_main_process)
        if not is_main_process:
            return
        edges = fit_edges(self, self.train_rows(), self.config.model.n_bins, self.store)
        save_statistics(self.statistics_path, edges=edges)

    def model_config(self) -> MaskedDiffusionConfig:
        if self._model_config is None:
            control = self.meta.control_label or "non-targeting"
            self._model_config = MaskedDiffusionConfig(
                **self.config.model.shape_kwargs(),
                n_genes=self.meta.n_genes,
                perturbation_labels=(control,),
            )
        return self._model_config

    def build_model(self) -> nn.Module:
        model = MaskedDiffusionPretrain(self.model_config())
        with np.load(self.statistics_path) as f:
            edges = f["edges"]
        model.set_statistics(edges, np.ones(self.meta.n_genes, np.float32), np.zeros(1))
        return model

    def model_card(self) -> dict[str, Any]:
        meta = self.meta
        with np.load(self.statistics_path) as f:
            edges = [float(e) for e in f["edges"]]
        split_file = self.config.run.dir_path / "split.json"
        return {
            "class": PRETRAIN_CLASS,
            "config": dataclasses.asdict(self.model_config()),
            **store_card(meta, ("cell_type", "batch")),
            "set_size": self.config.data.set_size,
            "store": str(self.store.absolute()),
            "split": json.loads(split_file.read_text()) if split_file.exists() else None,
            "bins": {"edges": edges, "from": "training cells"},
            "masking": {"adaptive": 0.0},
        }

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        g = self.model_config().n_genes
        example = np.zeros((2, 4, 1 + 2 * g), dtype=np.float32)
        example[:, :, 0] = self.model_config().null_code
        example[:, :, 1 + g :] = self.model_config().n_bins
        return DenoiserServing(model).eval(), example


class DenoiserServing(nn.Module):
    """The MLflow serving form, one denoising step on one float array ``(B, S, 1 + 2G)``: the
    perturbation code in column 0 (the first cell's; ``null_code`` = none), the control
    cells' log1p expression (cell i's paired control in row i), then the generated cells'
    current bins (``n_bins`` = MASK) ->
    bin log-probabilities (B, S, G, K). Whole-cell sampling is ``latentcell predict --run``
    or the ONNX bundle."""

    def __init__(self, model: MaskedDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        g = self.model.config.n_genes
        control = packed[:, :, 1 : 1 + g]
        memory = self.model.encode_controls(control)
        tokens, codes = packed[:, :, 1 + g :].long(), packed[:, 0, 0].long()
        logits = self.model.logits(tokens, self.model.tokenize(control), memory, codes)
        return torch.log_softmax(logits, dim=-1)
