"""``latentcell data split``: the cells of each part of a perturbation split as h5ad files.

    latentcell data split --store S --split split.toml --out DIR [--overwrite]

Commands that take cells rather than a store (``latentcell predict --controls``, ``latentcell
evaluate perturbation --real / --train``, cell-eval) need the split's cells as files; cutting
them by hand from the input h5ad is where a held-out cell slips into training. This writes
them from the store with the split ``train st`` uses (``perturbation_splits.assign_split``,
same function, same seed: the same rows):

``train.h5ad``
    The training cells: perturbed cells and controls.
``val.h5ad``
    The val cells, when the split has any.
``test.h5ad``
    The test cells (perturbed and held-out controls) plus ``test_controls.h5ad``'s cells.
``test_controls.h5ad``
    The controls each test prediction starts from (``latentcell predict --controls``), for
    every cell type with test cells: the cell type's held-out (test) controls where the split
    holds some out (``[split.cells]``, ``[split.cell_types]``); else its TRAINING controls,
    since a perturbation held out whole (zero-shot, ``[split.perturbations]``) is predicted
    from controls the model has seen (then these controls are in ``train.h5ad`` too, and
    ``.uns`` says so per cell type).
``split.npz``, ``split.json``
    The store rows of train / val / test and the split's summary, as a ``train st`` run saves
    them.

Each h5ad holds raw counts (float32 CSR) in X, in store row order; obs = the store's columns
under their original names (role columns too: ``target_gene``, not ``perturbation``), indexed
by the cell names; var = the store's genes (index = the vocabulary key, columns ``gene_id``,
``gene_symbol``); ``.uns['latentcell_split']`` = provenance: the store's path and manifest
sha256, the split file's path, text and sha256, the part's name, the cells of every part, the
store's roles and control label, and where the test controls come from.

The store is read once, one read unit at a time, each unit's cells dealt to the files that
hold them (memory: one unit plus the obs columns). The directory is built beside ``DIR`` and
renamed into place when every file is complete (``atomic.AtomicDir``): all files or none, and
an existing ``DIR`` is replaced only with ``--overwrite``.

``read_cells`` gives the same cells in memory (``latentcell predict --baseline --split``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .atomic import AtomicDir
from .blocks import CellBlock, StoreReader
from .errors import DataValidationError
from .h5ad_stream_writer import H5adStreamWriter
from .latent_store import source_fingerprint
from .perturbation_splits import (
    PerturbationSplit,
    assign_split,
    control_code,
    load_split_config,
    save_split,
)
from .store_common import latentcell_version
from .stores import open_store

__all__ = [
    "UNS_KEY",
    "open_count_store",
    "read_cells",
    "split_parts",
    "write_split_files",
]

UNS_KEY = "latentcell_split"


def open_count_store(path: str | os.PathLike, flag: str = "--store") -> StoreReader:
    """A count store with cell names (a latent store is refused: it holds no counts)."""
    reader = open_store(path, names=True)
    if reader.meta.format == "latent":
        raise DataValidationError(
            path, flag, "a latent store (VAE latents) holds no counts and no group index",
            "pass the count store written by latentcell data build",
        )  # fmt: skip
    return reader


def split_parts(
    reader: StoreReader, split: PerturbationSplit
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The sorted store rows of each file (``val`` only when non-empty; ``test_controls`` only
    when the store has control cells), and per test cell type where its controls come from
    ("test", "train", or "none" when it has no controls at all)."""
    controls, origin = _test_controls(reader, split)
    parts = {"train": split.train}
    if len(split.val):
        parts["val"] = split.val
    if controls is None:  # a store without controls (observational): no prediction inputs
        parts["test"] = split.test
    else:
        parts["test"] = np.union1d(split.test, controls)
        parts["test_controls"] = controls
    return parts, origin


def _test_controls(
    reader: StoreReader, split: PerturbationSplit
) -> tuple[np.ndarray | None, dict[str, str]]:
    meta = reader.meta
    control = control_code(meta)
    if control is None:
        return None, {}
    index = reader.group_index()
    starts = index["start"].to_numpy(np.int64)
    stops = index["stop"].to_numpy(np.int64)
    types = index["cell_type"].to_numpy(np.int64)
    is_control = index["perturbation"].to_numpy(np.int64) == control

    def inside(rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """``rows`` inside the ranges ``keep`` of the index."""
        pieces = [
            rows[np.searchsorted(rows, a) : np.searchsorted(rows, b)]
            for a, b in zip(starts[keep], stops[keep], strict=True)
        ]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    n_test = np.searchsorted(split.test, stops) - np.searchsorted(split.test, starts)
    column = meta.roles.get("cell_type")
    out, origin = [], {}
    for code in np.unique(types[n_test > 0]):
        name = meta.categories[column][code] if column is not None and code >= 0 else ""
        ranges = is_control & (types == code)
        held = inside(split.test, ranges)
        rows = held if len(held) else inside(split.train, ranges)
        origin[str(name)] = "test" if len(held) else ("train" if len(rows) else "none")
        out.append(rows)
    return (np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)), origin


class _Cells:
    """One file's cells as the store streams by: X to a writer (or kept), obs kept."""

    def __init__(self, reader: StoreReader, writer: H5adStreamWriter | None = None) -> None:
        self.meta, self.writer = reader.meta, writer
        self.X: list[sp.csr_matrix] = []
        self.obs_parts: list[CellBlock] = []  # the blocks' obs, without X

    def add(self, block: CellBlock) -> None:
        if self.writer is not None:
            self.writer.append(block.X)
        else:
            self.X.append(block.X)
        no_x = sp.csr_matrix((block.n_cells, 0), dtype=np.float32)
        self.obs_parts.append(dataclasses.replace(block, X=no_x))

    def obs(self) -> pd.DataFrame:
        meta = self.meta
        empty = CellBlock(
            X=sp.csr_matrix((0, 0), dtype=np.float32), rows=np.zeros(0, np.int64),
            library_size=np.zeros(0, np.float32),
            codes={c: np.zeros(0, np.int32) for c in meta.categories},
            numeric={c: np.zeros(0) for c in meta.numeric_columns}, names=None,
        )  # fmt: skip
        cells = CellBlock.concat(self.obs_parts) if self.obs_parts else empty
        frame = {}
        for column, categories in meta.categories.items():
            values = pd.Categorical.from_codes(
                cells.codes[column], categories=[str(c) for c in categories]
            )
            frame[column] = values.remove_unused_categories()
        for column in meta.numeric_columns:
            frame[column] = cells.numeric[column]
        names = cells.rows if cells.names is None else cells.names  # names: always in stores
        return pd.DataFrame(frame, index=pd.Index(np.asarray(names).astype(str), dtype=str))

    def var(self) -> pd.DataFrame:
        var = self.meta.var.copy()
        var.index = var.index.astype(str)
        return var

    def to_anndata(self, uns: dict | None = None) -> ad.AnnData:
        n_genes = self.meta.n_genes
        X = sp.vstack(self.X, format="csr") if self.X else sp.csr_matrix((0, n_genes))
        return ad.AnnData(
            X=X.astype(np.float32), obs=self.obs(), var=self.var(), uns=dict(uns or {})
        )


def _deal(reader: StoreReader, parts: dict[str, np.ndarray], sinks: dict[str, _Cells]) -> None:
    """Read each unit holding a wanted row once and hand every sink its rows of it."""
    sizes = np.asarray(reader.meta.unit_sizes, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cuts = {name: np.searchsorted(rows, bounds) for name, rows in parts.items()}
    for unit in range(len(sizes)):
        wanted = {n: c[unit + 1] > c[unit] for n, c in cuts.items()}
        if not any(wanted.values()):
            continue
        block = reader.read_unit(unit)
        for name, rows in parts.items():
            if wanted[name]:
                c = cuts[name]
                local = rows[c[unit] : c[unit + 1]] - bounds[unit]
                sinks[name].add(block if len(local) == block.n_cells else block.take(local))


def read_cells(reader: StoreReader, rows: np.ndarray, uns: dict | None = None) -> ad.AnnData:
    """``rows`` of the store as one in-memory AnnData, laid out as ``data split``'s files."""
    sink = _Cells(reader)
    _deal(reader, {"cells": np.unique(np.asarray(rows, dtype=np.int64))}, {"cells": sink})
    return sink.to_anndata(uns)


def _provenance(reader, store: Path, split_file: Path, text: str, counts, origin) -> dict:
    meta = reader.meta
    return {
        "store": str(store.absolute()),
        "store_manifest_sha256": source_fingerprint(store),
        "split_file": str(split_file.absolute()),
        "split_toml": text,
        "split_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "counts": {name: int(n) for name, n in counts.items()},
        "roles": {role: col for role, col in meta.roles.items() if col},
        **({"control_label": meta.control_label} if meta.control_label is not None else {}),
        "test_controls_from": dict(origin),
        "latentcell_version": latentcell_version(),
    }


def write_split_files(
    store: str | os.PathLike,
    split_file: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
) -> dict:
    """Write the split's files into the directory ``out`` (see the module docstring);
    returns the cells per file."""
    store, split_file = Path(store), Path(split_file)
    config = load_split_config(split_file)  # a bad file fails before the store is read
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataValidationError(
            out, "--out", f"{parent} is a file, not a directory", "choose another --out"
        )
    reader = open_count_store(store)
    split = assign_split(reader, config)
    parts, origin = split_parts(reader, split)
    counts = {name: len(rows) for name, rows in parts.items()}
    common = _provenance(reader, store, split_file, split_file.read_text(), counts, origin)
    with AtomicDir(out, overwrite=overwrite) as build, contextlib.ExitStack() as files:
        sinks = {}
        for name in parts:
            writer = H5adStreamWriter(build.tmp / f"{name}.h5ad", reader.meta.n_genes)
            files.enter_context(writer)
            sinks[name] = _Cells(reader, writer)
        _deal(reader, parts, sinks)
        for name, sink in sinks.items():
            uns = {UNS_KEY: {**common, "part": name, "n_cells": counts[name]}}
            sink.writer.close(sink.obs(), sink.var(), uns)
        save_split(split, build.tmp)
        build.commit()
    return counts


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``latentcell data split``."""
    parser.add_argument("--store", required=True, help="the count store the split assigns")
    parser.add_argument("--split", required=True, help="split TOML (as train st's split.file)")
    parser.add_argument("--out", required=True, help="directory to create (train.h5ad, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_split(args: argparse.Namespace) -> int:
    """Write the files; prints one line (cells per file)."""
    counts = write_split_files(args.store, args.split, args.out, args.overwrite)
    parts = ", ".join(f"{name} {n}" for name, n in counts.items())
    print(f"wrote {args.out}: {parts} cells ({', '.join(f'{n}.h5ad' for n in counts)})")
    return 0
