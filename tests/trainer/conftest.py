"""Fixtures for the trainer tests: a small real store, and a clean Accelerate state."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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
