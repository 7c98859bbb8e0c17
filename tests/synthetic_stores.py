"""Stores the tests of several packages build the same way."""

from __future__ import annotations

from pathlib import Path

import anndata as ad


def store_without_cell_type(root: Path) -> tuple[ad.AnnData, Path]:
    """The README's Papalexi shape: synthetic perturbation cells whose input h5ad has no
    cell-type column (the store labels them IMPLICIT_LABEL). Returns (the cells, the store)."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    synthesize(SynthConfig(n_cells=400, n_genes=60, n_perturbations=3, n_cell_types=1,
                           n_batches=2, seed=2), root / "typed.h5ad")  # fmt: skip
    cells = ad.read_h5ad(root / "typed.h5ad")
    del cells.obs["cell_type"]
    cells.write_h5ad(root / "cells.h5ad")
    build_store([root / "cells.h5ad"], root / "cells.zarr", schema="vcc", chunk_cells=100)
    return cells, root / "cells.zarr"


def chunky_sorted_store(root: Path, chunk_cells: int = 1000) -> Path:
    """The small store of the validation-split issue: 1,090 cells x 40 genes of 5 cell types
    (93 to 336 cells each), sorted by group, in 1,000-cell chunks: a split by read units holds
    out one of its 2 units, and with it whole cell types."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    synthesize(SynthConfig(n_cells=1090, n_genes=40, n_perturbations=2, n_cell_types=5,
                           n_batches=2, seed=4), root / "chunky.h5ad")  # fmt: skip
    store = root / "chunky.zarr"
    build_store([root / "chunky.h5ad"], store, schema="vcc", chunk_cells=chunk_cells)
    return store
