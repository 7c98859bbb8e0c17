"""Shared fixtures: where the real datasets live (skip when absent), a small real store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$LATENTCELL_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("LATENTCELL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_file():
    """Return a function mapping a file name in the shared data folder to its path, or skip."""

    def _get(name: str) -> Path:
        path = shared_data_dir() / name
        if not path.exists():
            pytest.skip(f"real dataset {path} is absent")
        return path

    return _get


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A real Zarr store: 1,200 synthetic VCC cells x 200 genes in 100-cell chunks."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("small_store")
    h5ad = root / "cells.h5ad"
    synthesize(
        SynthConfig(
            n_cells=1200, n_genes=200, n_perturbations=4, n_cell_types=2, n_batches=2, seed=1
        ),
        h5ad,
    )
    store = root / "cells.zarr"
    build_store([h5ad], store, format="zarr", schema="vcc", chunk_cells=100)
    return store
