"""A tiny conditional-VAE run on a synthetic perturbation store with strong, known effects,
shared by the cvae tests of several packages (predictor, export)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anndata as ad

QUIET = ("train.progress=false", "train.eval_every=0", "train.checkpoint_every=0",
         "tracking.enabled=false")  # fmt: skip


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_cvae(*overrides: str) -> int:
    return train_family("cvae", *overrides)


def train_family(family: str, *overrides: str) -> int:
    """``latentcell train FAMILY --set ...`` in this process, quiet and untracked."""
    from latentcell.launch.cli import main

    argv = ["train", family]
    for item in (*QUIET, *overrides):
        argv += ["--set", str(item)]
    try:
        return main(argv)
    finally:
        reset_accelerate()


def cvae_store(root: Path) -> tuple[ad.AnnData, Path, Path]:
    """1,200 cells x 60 genes, 3 perturbations with a latent shift of scale 1.5 (strong), 2
    cell types, 2 batches; and a split TOML (iid cells, 25% test, one perturbation held out
    whole). Returns (the cells, the store, the split file)."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    synthesize(SynthConfig(n_cells=1200, n_genes=60, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=11, pert_shift_scale=1.5,
                           control_fraction=0.3), root / "cells.h5ad")  # fmt: skip
    build_store([root / "cells.h5ad"], root / "cells.zarr", schema="vcc", chunk_cells=200)
    split = root / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.25\n"
        "[split.perturbations]\nn_test = 1\n"
    )
    return ad.read_h5ad(root / "cells.h5ad"), root / "cells.zarr", split


def trained_cvae(root: Path, *overrides: str) -> SimpleNamespace:
    """``cvae_store`` and a run trained on it (250 steps of 128 cells: seconds on a CPU)."""
    import json

    cells, store, split = cvae_store(root)
    run = root / "cvae"
    assert train_cvae(f"data.path={store}", f"split.file={split}", f"run.dir={run}",
                      "data.batch_size=128", "model.n_hidden=64", "model.kl_warmup_steps=100",
                      "optim.lr=1e-2", "train.max_steps=250", *overrides) == 0  # fmt: skip
    held = json.loads((run / "split.json").read_text())["held_out"]["test_perturbations"]
    return SimpleNamespace(root=root, cells=cells, store=store, split=split, run=run, held=held)
