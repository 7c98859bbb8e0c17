"""The multiomics training stage (``latentcell train multiomics``): RNA and protein counts of
the same cells (CITE-seq), the joint VAE of ``models/multiomics.py``, the shared loop.

    latentcell train multiomics --set data.path=CELLS.h5ad [--set data.n_top_genes=2000]

The input is one h5ad (RNA counts in ``X``, protein counts in ``obsm[data.protein_key]``),
read whole: CITE-seq panels are small (hundreds to tens of thousands of cells, tens to a few
hundred proteins), so the family reads into memory rather than through a count store.
``prepare_data`` (main process) checks both matrices (``data_pipelines/paired_counts.py``),
holds out ``data.val_fraction`` of the cells (seeded by ``data.split_seed``), chooses the
modelled genes on the training cells only (the ``data.n_top_genes`` most variable, Seurat
v3 on counts, as ``data build --hvg`` does; 0 keeps every gene) and writes the training and
validation matrices to ``<run.dir>/cells.npz``. A resumed run reuses that file when the input
file (its sha256) and the data settings are unchanged, so it continues on the same cells and
genes. Every rank then streams its share of the cells (``pair_batches.PairBatches``).

The model card records the genes and proteins in model order and the training cells' median
RNA and protein libraries: translation writes counts at those libraries
(``inference/multiomics_translator.py``).
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
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.multiomics import (
    ALIGNMENTS,
    MODEL_CLASS,
    MultiomicsConfig,
    MultiomicsVAE,
    TranslationServing,
)

from .pair_batches import PairBatches
from .sections import OptimConfig, RunSection, TrainConfig
from .tracking import TrackingConfig

__all__ = ["MODEL_CLASS", "MultiomicsRunConfig", "MultiomicsStage"]

CELLS_FILE = "cells.npz"
MIN_CELLS = 10  # fewer cannot train a model or hold out validation cells
# On 400 training cells of the CITE-seq PBMC file (batch 128, ~250 epochs) the validation
# loss was lowest between 500 and 1,000 steps and rose after (overfitting); a larger panel
# wants more steps. The README section "Multi-omics" has the held-out accuracy at 800.
DEFAULT_STEPS = 800


@dataclass(frozen=True)
class MultiomicsDataSection:
    """path: an h5ad with RNA counts in X and protein counts in obsm[protein_key] (required).
    n_top_genes: the RNA genes modelled, the most variable of the training cells (0: every
    gene). val_fraction: cells held out for validation (0: none), chosen by split_seed.
    batch_size: cells per step per process."""

    path: str = ""
    protein_key: str = "protein_counts"
    n_top_genes: int = 2000
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.n_top_genes < 0 or self.split_seed < 0 or self.batch_size < 1:
            raise ValueError("n_top_genes >= 0, split_seed >= 0 and batch_size >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.protein_key:
            raise ValueError("protein_key must name the obsm entry of the protein counts")


@dataclass(frozen=True)
class MultiomicsModelSection:
    """The joint VAE (``models/multiomics.py``): rna_likelihood nb | zinb (proteins are NB);
    alignment symmetric_kl | mean_distance between the two posteriors of a cell, weighted by
    alignment_weight; cross_reconstruction decodes each modality from the other's posterior
    in training (translation trained directly)."""

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    rna_likelihood: str = "nb"
    dropout: float = 0.1
    alignment: str = "symmetric_kl"
    alignment_weight: float = 1.0
    cross_reconstruction: bool = True
    kl_warmup_steps: int = 200

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        self.model_config(1, 1)  # every other key fails here, naming itself

    def model_config(self, n_genes: int, n_proteins: int) -> MultiomicsConfig:
        keys = dataclasses.asdict(self)
        return MultiomicsConfig(n_genes=n_genes, n_proteins=n_proteins, **keys)


@dataclass(frozen=True)
class MultiomicsRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/multiomics"))
    data: MultiomicsDataSection = field(default_factory=MultiomicsDataSection)
    model: MultiomicsModelSection = field(default_factory=MultiomicsModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=DEFAULT_STEPS))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _sha256(path: Path) -> str:
    from latentcell.data_pipelines.atomic import sha256_file

    return sha256_file(path)


def select_genes(counts, n_top: int) -> np.ndarray:
    """Columns of the ``n_top`` most variable genes of ``counts`` (CSR, training cells), in
    their file order; every column when ``n_top`` is 0 or covers them all."""
    from latentcell.data_pipelines.hvg import seurat_v3

    n_genes = counts.shape[1]
    if n_top == 0 or n_top >= n_genes:
        return np.arange(n_genes)
    table = seurat_v3(lambda: [counts], n_genes, n_top)
    return np.flatnonzero(table["highly_variable"].to_numpy())


class MultiomicsStage:
    name = "multiomics"

    def __init__(self, config: MultiomicsRunConfig) -> None:
        self.config = config
        self._cells: dict[str, np.ndarray] | None = None

    @property
    def source(self) -> Path:
        if not self.config.data.path:
            raise DataValidationError(
                "latentcell train multiomics", "data.path", "no input file (the family has no "
                "built-in data)", "pass --set data.path=CELLS.h5ad (RNA counts in X, protein "
                "counts in obsm['protein_counts'])",
            )  # fmt: skip
        return Path(self.config.data.path)

    @property
    def cells_path(self) -> Path:
        return self.config.run.dir_path / CELLS_FILE

    # -- data -----------------------------------------------------------------------------

    def prepare_data(self, is_main_process: bool) -> None:
        if not is_main_process:
            return
        from latentcell.data_pipelines.read_h5ad import read_h5ad

        source = self.source
        fingerprint = self.fingerprint(_sha256(source) if source.is_file() else "")
        if self.cells_path.exists():
            with np.load(self.cells_path, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fingerprint:
                    return  # a resumed run: the same cells and genes
        adata = read_h5ad(source, "data.path")
        cells = self._read_cells(adata, source)
        cells["fingerprint"] = np.asarray(fingerprint)
        out = self.config.run.dir_path
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CELLS_FILE}.tmp-{os.getpid()}.npz"
        np.savez_compressed(tmp, **cells)
        tmp.replace(self.cells_path)

    def fingerprint(self, file_sha: str) -> str:
        """What the cells depend on: the input file and the data settings."""
        d = self.config.data
        h = hashlib.sha256()
        for part in (file_sha, d.protein_key, d.n_top_genes, d.val_fraction, d.split_seed):
            h.update(str(part).encode() + b"\0")
        return h.hexdigest()

    def _read_cells(self, adata, source: Path) -> dict[str, np.ndarray]:
        from latentcell.data_pipelines.paired_counts import protein_counts, rna_counts

        d = self.config.data
        rna = rna_counts(adata, source)
        protein, proteins = protein_counts(adata, d.protein_key, source)
        if adata.n_obs < MIN_CELLS:
            raise DataValidationError(source, "cells", f"{adata.n_obs} cells, fewer than "
                                      f"{MIN_CELLS}", "train on more cells")  # fmt: skip
        rng = np.random.default_rng(d.split_seed)
        n_val = int(round(d.val_fraction * adata.n_obs))
        order = rng.permutation(adata.n_obs)
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        genes = select_genes(rna[train], d.n_top_genes)
        dense = rna[:, genes].toarray()
        uns_source = adata.uns.get("source")
        return {
            "train_rna": dense[train], "train_protein": protein[train],
            "val_rna": dense[val], "val_protein": protein[val],
            "train_rows": train, "val_rows": val,
            "genes": np.asarray([str(g) for g in adata.var_names[genes]]),
            "proteins": np.asarray(proteins),
            "n_input_genes": np.asarray(adata.n_vars),
            "source_note": np.asarray(uns_source if isinstance(uns_source, str) else ""),
        }  # fmt: skip

    @property
    def cells(self) -> dict[str, np.ndarray]:
        if self._cells is None:
            with np.load(self.cells_path, allow_pickle=False) as f:
                self._cells = {k: f[k] for k in f.files}
        return self._cells

    def _loader(self, part: str, rank: int, world_size: int, train: bool) -> PairBatches:
        arrays = {"rna": self.cells[f"{part}_rna"], "protein": self.cells[f"{part}_protein"]}
        return PairBatches(arrays, self.config.data.batch_size, rank, world_size,
                           seed=self.config.train.seed, shuffle=train)  # fmt: skip

    def train_loader(self, rank: int, world_size: int) -> PairBatches:
        return self._loader("train", rank, world_size, True)

    def val_loader(self, rank: int, world_size: int) -> PairBatches | None:
        if not len(self.cells["val_rows"]):
            return None
        return self._loader("val", rank, world_size, False)

    # -- model ----------------------------------------------------------------------------

    def model_config(self) -> MultiomicsConfig:
        c = self.cells
        return self.config.model.model_config(len(c["genes"]), len(c["proteins"]))

    def build_model(self) -> nn.Module:
        return MultiomicsVAE(self.model_config())

    def model_card(self) -> dict[str, Any]:
        c, d = self.cells, self.config.data
        card = {
            "class": MODEL_CLASS,
            "config": dataclasses.asdict(self.model_config()),
            "genes": [str(g) for g in c["genes"]],
            "proteins": [str(p) for p in c["proteins"]],
            "protein_key": d.protein_key,
            # the libraries translated counts are written at (medians over training cells)
            "rna_library": float(np.median(c["train_rna"].sum(1))),
            "protein_library": float(np.median(c["train_protein"].sum(1))),
            "data": {
                "path": str(self.source.absolute()),
                "source": str(c["source_note"]),
                "n_input_genes": int(c["n_input_genes"]),
                "n_top_genes": d.n_top_genes,
                "gene_selection": "seurat_v3 on the training cells' counts"
                if len(c["genes"]) < int(c["n_input_genes"]) else "every gene",
                "n_train": int(len(c["train_rows"])),
                "n_val": int(len(c["val_rows"])),
                "val_fraction": d.val_fraction,
                "split_seed": d.split_seed,
            },
        }  # fmt: skip
        return json.loads(json.dumps(card))

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        example = np.zeros((2, self.model_config().n_genes), np.float32)
        example[:, :10] = 1.0
        return TranslationServing(model).eval(), example
