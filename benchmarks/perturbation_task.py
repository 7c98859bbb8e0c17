"""The leaderboard's task: a count store and a split file -> training cells, the real test
cells (with the control cells every prediction starts from) and the perturbations to score.

The control cells a method predicts from are the test split's controls when it has some
(held-out cells; with perturbations held out whole, only those are scored); otherwise the training controls of the test cells' cell types (a held-out
cell type: its controls stay in training, its perturbed cells are the test). Either way the
same controls go into REAL too, so every method's deltas are taken against the same cells.
Without ``--data`` the task is synthetic with a known answer: data with cell-type-specific
responses (``data synth --pert-type-scale``) and one cell type's perturbed cells held out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark perturbation"


@dataclass(frozen=True)
class Task:
    store: Path
    split_file: Path
    train: ad.AnnData
    real: ad.AnnData  # the test cells plus the controls predictions start from
    controls: ad.AnnData
    perturbations: tuple[str, ...]
    pert_col: str
    control: str
    cell_type_col: str | None
    batch_col: str | None
    description: str


def synthetic_task(out: Path, seed: int, cell_type: str | None) -> tuple[Path, Path]:
    """A synthetic store with cell-type-specific responses and a split that holds out one
    cell type's perturbed cells (``cell_type``, default the first)."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.stores import open_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    store = out / "synthetic_store.zarr"
    if not (store / "manifest.json").exists():
        h5ad = out / "synthetic.h5ad"
        synthesize(SynthConfig(
            n_cells=8_000, n_genes=300, n_perturbations=8, n_cell_types=3, n_batches=2,
            seed=seed, pert_type_scale=0.5, pert_shift_scale=0.8,
        ), h5ad)  # fmt: skip
        build_store([h5ad], store, schema="vcc", chunk_cells=500)
        h5ad.unlink()
    meta = open_store(store).meta
    column = meta.roles["cell_type"]
    types = list(meta.categories[column])
    held = cell_type or types[0]
    if held not in types:
        raise DataValidationError(
            COMMAND, "--cell-type", f"unknown {held!r}", f"use one of {types}"
        )
    perts = [p for p in meta.categories[meta.roles["perturbation"]] if p != meta.control_label]
    split = out / "synthetic_split.toml"
    split.write_text(
        f"[split]\nseed = {seed}\n[[split.perturbations]]\ntest = {json.dumps(perts)}\n"
        f"cell_types = {json.dumps([held])}\n"
    )
    return store, split


def check_task_flags(command: str, args, families, with_vae: bool = False) -> None:
    """``--set FAMILY:KEY=VALUE`` names a chosen family (or ``vae``, the count VAE trained for
    the latent baseline or a ``Family.vae`` family), and ``--data``/``--split`` come together:
    one error line each, before any work."""
    allowed = [f.name for f in families]
    if with_vae or any(f.vae for f in families):
        allowed.append("vae")
    for entry in args.overrides:
        family, sep, rest = entry.partition(":")
        if not sep or family not in allowed or "=" not in rest:
            raise DataValidationError(command, "--set", f"got {entry!r}",
                                      f"pass FAMILY:KEY=VALUE with FAMILY in {allowed}")  # fmt: skip
    if bool(args.data) != bool(args.split):
        raise DataValidationError(command, "--data/--split", "give both or neither",
                                  "pass --data STORE --split SPLIT.toml, or neither for the "
                                  "synthetic task")  # fmt: skip


def open_task(out: Path, data: str | None, split: str | None, cell_type: str | None = None):
    """The task of a benchmark command and its ``--out`` folder: ``--data``/``--split``'s (a
    bad store or split fails before ``out`` exists), else the synthetic one built in ``out``."""
    if data:
        task = load_task(Path(data).absolute(), Path(split).absolute())
        out.mkdir(parents=True, exist_ok=True)
        return task
    out.mkdir(parents=True, exist_ok=True)
    return load_task(*synthetic_task(out, 0, cell_type))


def load_task(store: Path, split_file: Path) -> Task:
    from latentcell.data_pipelines.perturbation_splits import assign_split, load_split_config
    from latentcell.data_pipelines.split_files import open_count_store, read_cells

    config = load_split_config(split_file)
    reader = open_count_store(store, "--data")
    meta = reader.meta
    pert_col, control = meta.roles.get("perturbation"), meta.control_label
    if pert_col is None or control is None:
        raise DataValidationError(
            store, "roles.perturbation", "the store has no perturbation column or control label",
            "build it with latentcell data build --schema vcc (or --pert-col / --control)",
        )  # fmt: skip
    split = assign_split(reader, config)
    if len(split.test) == 0:
        raise DataValidationError(
            split_file, "split", "the split leaves no test cells", "hold out cells or perturbations"
        )
    train, test = read_cells(reader, split.train), read_cells(reader, split.test)
    type_col, batch_col = meta.roles.get("cell_type"), meta.roles.get("batch")
    test_labels = test.obs[pert_col].astype(str).to_numpy()
    held = set(split.test_perturbations)
    if held:  # perturbations held out whole: the task is those (zero-shot), with the controls
        keep = np.isin(test_labels, [*held, control])
        test, test_labels = test[keep].copy(), test_labels[keep]
    perturbations = tuple(sorted(set(test_labels) - {control}))
    if not perturbations:
        raise DataValidationError(
            split_file, "split", "the test cells hold no perturbed cell", "hold out perturbed cells"
        )
    if (test_labels == control).any():
        controls, real = test[test_labels == control].copy(), test
        described = (
            f"held-out perturbations {sorted(held)}: the test split's controls" if held
            else "held-out cells: the test split's own controls"
        )  # fmt: skip
    else:  # a held-out cell type: its controls stay in training
        in_types = np.ones(train.n_obs, dtype=bool)
        if type_col:
            wanted = set(test.obs[type_col].astype(str))
            in_types = train.obs[type_col].astype(str).isin(wanted).to_numpy()
        is_control = (train.obs[pert_col].astype(str) == control).to_numpy()
        controls = train[in_types & is_control].copy()
        if controls.n_obs == 0:
            raise DataValidationError(
                split_file, "split", "no control cells to predict from (none in the test "
                "split, none of the test cell types in training)",
                "keep control cells of the test cell types in training or in test",
            )  # fmt: skip
        real = ad.concat([test, controls], merge="same")
        real.obs_names_make_unique()
        described = "held-out cell type(s): their training controls"
    return Task(
        store, split_file, train, real, controls, perturbations, pert_col, control, type_col,
        batch_col, described,
    )  # fmt: skip
