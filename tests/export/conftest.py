"""Tiny trained runs (count VAE, DDPM and flow DiTs, a zero-shot ST) tracked in a real
MLflow SQLite store, and their exported bundles, shared by the export tests."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from types import SimpleNamespace

import pytest

from latentcell.launch.cli import main


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(stage: str, *overrides: str) -> None:
    common = ("train.progress=false", "train.checkpoint_every=0", "train.eval_every=0",
              "tracking.log_model=false")  # fmt: skip
    argv = ["train", stage]
    for item in (*common, *overrides):
        argv += ["--set", item]
    try:
        assert main(argv) == 0
    finally:
        _reset_accelerate()


def export(run, out, **kwargs) -> dict:
    from latentcell.export.exporters import export_run

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return export_run(run, out, **kwargs)


@pytest.fixture(scope="session")
def runs(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    vae = root / "vae"
    train("vae", f"data.path={small_store}", f"run.dir={vae}", "model.n_latent=4",
          "model.n_hidden=32", "model.kl_warmup_steps=20", "optim.lr=3e-3",
          "train.max_steps=40", "data.batch_size=128")  # fmt: skip
    dits = {}
    for objective in ("ddpm", "flow"):
        dits[objective] = root / f"dit_{objective}"
        train("dit", f"data.path={small_store}", f"run.dir={dits[objective]}", f"vae.run={vae}",
              "model.hidden=32", "model.depth=1", "model.heads=2", "model.patch_size=2",
              f"diffusion.objective={objective}", "diffusion.sample_steps=8",
              "optim.lr=3e-3", "train.max_steps=30", "data.batch_size=128")  # fmt: skip
    split = root / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n"
        "[split.perturbations]\nn_test = 1\n"
    )
    st = root / "st"
    train("st", f"data.path={small_store}", f"split.file={split}", f"run.dir={st}",
          "data.set_size=16", "data.sets_per_batch=4", "model.hidden=32", "model.depth=1",
          "model.heads=2", "model.target_effect=true", "model.perturbation_dropout=0.5",
          "model.basal=train", "train.max_steps=8")  # fmt: skip
    held = json.loads((st / "split.json").read_text())["held_out"]["test_perturbations"][0]
    return SimpleNamespace(root=root, store=small_store, vae=vae, dit=dits["ddpm"],
                           flow=dits["flow"], st=st, held=held, split=split)  # fmt: skip


@pytest.fixture(scope="session")
def more_runs(runs):
    """An ST in a batch-free VAE's latent space, and an ST pretraining run."""
    root, store = runs.root, runs.store
    vae = root / "vae_nobatch"
    train("vae", f"data.path={store}", f"run.dir={vae}", "model.n_latent=4", "model.n_hidden=32",
          "model.batch_conditioning=false", "train.max_steps=20", "data.batch_size=128",
          "tracking.enabled=false")  # fmt: skip
    latent = root / "st_latent"
    train("st", f"data.path={store}", f"split.file={runs.split}", f"run.dir={latent}",
          f"vae.run={vae}", "model.space=latent", "data.set_size=16", "data.sets_per_batch=4",
          "model.hidden=32", "model.depth=1", "model.heads=2", "train.max_steps=6",
          "tracking.enabled=false")  # fmt: skip
    pretrain = root / "st_pretrain"
    train("st-pretrain", f"data.path={store}", f"run.dir={pretrain}", "data.set_size=16",
          "data.sets_per_batch=4", "data.val_fraction=0.15", "model.hidden=32", "model.depth=1",
          "model.heads=2", "train.max_steps=4", "tracking.enabled=false")  # fmt: skip
    table = root / "st_gene_table"
    train("st", f"data.path={store}", f"split.file={runs.split}", f"run.dir={table}",
          "model.perturbation_encoder=gene_table", "data.set_size=16", "data.sets_per_batch=4",
          "model.hidden=32", "model.depth=1", "model.heads=2", "train.max_steps=4",
          "tracking.enabled=false")  # fmt: skip
    return SimpleNamespace(st_latent=latent, st_pretrain=pretrain, st_gene_table=table)


@pytest.fixture(scope="session")
def bundles(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return SimpleNamespace(
        root=root,
        vae=root / "vae", dit=root / "dit", flow=root / "flow", st=root / "st",
        meta={name: export(getattr(runs, name), root / name) for name in ("vae", "dit", "flow", "st")},
    )  # fmt: skip


def _store_cell_types(store) -> list[str]:
    from latentcell.data_pipelines.stores import open_store

    meta = open_store(store).meta
    return list(meta.categories[meta.roles["cell_type"]])


@pytest.fixture(scope="session")
def held_type(runs, tmp_path_factory):
    """A run whose split holds out a whole cell type (controls included), trained with the
    unknown cell type (cell_type_dropout) and basal=train, and its bundle."""
    root = tmp_path_factory.mktemp("held_type")
    kept, held = _store_cell_types(runs.store)[:2]
    split = root / "split.toml"
    split.write_text(f"[split]\nseed = 0\n[split.cell_types]\ntest = [{held!r}]\n")
    run = root / "st"
    train("st", f"data.path={runs.store}", f"split.file={split}", f"run.dir={run}",
          "data.set_size=16", "data.sets_per_batch=4", "model.hidden=32", "model.depth=1",
          "model.heads=2", "model.basal=train", "model.cell_type_dropout=0.5",
          "train.max_steps=4", "tracking.enabled=false")  # fmt: skip
    meta = export(run, root / "bundle")
    return SimpleNamespace(run=run, bundle=root / "bundle", meta=meta, kept=kept, held=held)


@pytest.fixture(scope="session")
def implicit_type(tmp_path_factory):
    """The README's Papalexi shape: an input without a cell-type column (its cells get
    IMPLICIT_LABEL in the store), a tiny ST run on it and its bundle."""
    from tests.synthetic_stores import store_without_cell_type

    root = tmp_path_factory.mktemp("implicit_type")
    cells, store = store_without_cell_type(root)
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\ntest_fraction = 0.2\n")
    train("st", f"data.path={store}", f"split.file={split}",
          f"run.dir={root / 'st'}", "data.set_size=16", "data.sets_per_batch=4",
          "model.hidden=32", "model.depth=1", "model.heads=2", "model.basal=train",
          "train.max_steps=2", "tracking.enabled=false")  # fmt: skip
    export(root / "st", root / "bundle")
    return SimpleNamespace(run=root / "st", bundle=root / "bundle", cells=cells)
