"""A stage's validation split held out of its own store (``data.val_fraction``): chosen once
by the main process, kept in the run, streamed by every rank.

``prepare`` (main process, from ``prepare_data``) chooses the split
(``data_pipelines.split_choice``: ``data.split_by``, ``data.stratify``), prints one line
saying which and why, and writes ``val_split.npz`` (train / val: read units or store rows)
and ``val_split.json`` (the choice; the model card copies it as ``validation_split``). Every
rank's loaders then read those files, so all agree without choosing again; the rows go
through ``row_subset`` (their digest is in the stream's layout: exact resume, and a resume on
another split is refused). The choice depends only on (store, config), so a resumed run
writes the same files again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.row_subset import row_subset_factory
from latentcell.data_pipelines.split_choice import choose_split
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.unit_split import subset_factory

__all__ = ["VAL_SPLIT_RECORD", "VAL_SPLIT_ROWS", "prepare", "read_record", "sources", "used"]

VAL_SPLIT_ROWS = "val_split.npz"
VAL_SPLIT_RECORD = "val_split.json"


def used(config) -> bool:
    """Whether a run config validates on ``data.val_fraction`` of its store (no split.file,
    no data.val_path, a fraction above 0)."""
    data = config.data
    return not (config.split.file or data.val_path) and data.val_fraction > 0


def prepare(
    store: str | os.PathLike, data, columns: Sequence[str], run_dir: Path, announce: bool
) -> dict:
    """Choose the split of ``store`` for ``data`` (a ``DataConfig``) stratified by
    ``columns``, write it into ``run_dir``, print its line if ``announce``; the record."""
    chosen = choose_split(
        open_store(store), data.split_by, columns, data.val_fraction, data.split_seed
    )
    if announce:
        print(chosen.line(), file=sys.stderr, flush=True)
    record = {**chosen.record(), "asked": _asked(store, data, columns)}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{VAL_SPLIT_ROWS}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, train=chosen.train, val=chosen.val)
        tmp.replace(run_dir / VAL_SPLIT_ROWS)
    finally:
        tmp.unlink(missing_ok=True)
    tmp = run_dir / f".{VAL_SPLIT_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / VAL_SPLIT_RECORD)
    return record


def read_record(run_dir: Path) -> dict | None:
    """The run's ``val_split.json`` (None without one)."""
    path = run_dir / VAL_SPLIT_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def sources(
    path: str | os.PathLike, store: str | os.PathLike, data, columns: Sequence[str], run_dir: Path
) -> tuple[partial, partial]:
    """Reader factories of the train and val parts of the split of ``store`` in ``run_dir``
    over the store at ``path`` (the count store, or its latent store: same rows and units).
    Loaders built outside a run (no ``prepare``, or one for other settings) choose it again,
    silently."""
    record = read_record(run_dir)
    if record is None or record.get("asked") != _asked(store, data, columns):
        record = prepare(store, data, columns, run_dir, announce=False)
    rows = run_dir / VAL_SPLIT_ROWS
    if record["by"] == "cells":
        return row_subset_factory(path, rows, "train"), row_subset_factory(path, rows, "val")
    with np.load(rows) as f:
        return subset_factory(path, f["train"]), subset_factory(path, f["val"])


def _asked(store, data, columns: Sequence[str]) -> dict:
    """The settings a split was chosen for."""
    return {
        "store": str(Path(store).absolute()),
        "split_by": data.split_by,
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
        "stratify": list(columns),
    }
