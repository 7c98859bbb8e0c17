"""A reader view of one store restricted to a set of rows (a split's train or val cells).

``latentcell train vae`` and ``train dit`` with ``split.file`` must stream exactly the rows
``train st`` trains on (``perturbation_splits.assign_split``), which are scattered over the
store's read units (an iid split keeps about 70% of every unit). Two ways were open:

- a row mask inside the stream, marking excluded rows as padding (as ``skipping_reader`` does
  for damaged units): the stream would still read and batch the held-out cells, and every
  batch would carry a share of pads, so the effective batch size and the epoch length would
  depend on the split;
- a view (this module), like ``unit_split.UnitSubset``: unit k of the view is base unit
  ``units[k]`` with only the selected rows kept. Units with no selected row are dropped.

The view is a plain ``StoreReader``: the stream plans its epochs from the view's unit sizes,
every batch is full of selected cells, pad tails repeat selected cells only, and held-out
cells never leave this module (a unit is read whole, as fast as before, then cut). Blocks keep
the base store's global row ids, so batches can be checked against the split.

Exact resume: the stream's layout (``cell_stream.CellStream._layout``) includes
``rows_digest``, the sha256 of the sorted selected rows, so a checkpoint never resumes on
another split that happens to have the same number of cells and units.

The latent store of the DiT mirrors its count store's units and row ids, so the same rows give
the same cells in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .blocks import CellBlock, StoreMeta, StoreReader
from .errors import DataValidationError
from .stores import open_store
from .unit_split import rows_of_units

__all__ = [
    "RowSubset",
    "open_row_subset",
    "row_subset_factory",
    "rows_digest",
    "split_sources",
]


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of the rows as sorted int64 (the identity of a subset)."""
    return hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()


class RowSubset:
    """A ``StoreReader`` exposing only ``rows`` of ``base`` (see the module docstring).

    Rows of the view are numbered consecutively for ``read_rows`` (in base row order); the
    blocks it returns carry the base store's row ids.
    """

    def __init__(self, base: StoreReader, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))  # sorted, once each
        n = base.meta.n_cells
        if len(rows) == 0:
            raise ValueError("a row subset needs at least one row")
        if rows[0] < 0 or rows[-1] >= n:
            raise ValueError(f"rows must lie in [0, {n}), got {rows[0]}..{rows[-1]}")
        sizes = np.asarray(base.meta.unit_sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        # selected rows per base unit: rows[cut[u]:cut[u + 1]]
        cut = np.searchsorted(rows, starts)
        counts = np.diff(cut)
        self.base = base
        self.rows = rows
        self.units = np.flatnonzero(counts > 0)
        self.rows_digest = rows_digest(rows)
        self._cut, self._unit_start = cut, starts
        sub_sizes = counts[self.units]
        self._starts = np.concatenate([[0], np.cumsum(sub_sizes)])
        self.meta: StoreMeta = dataclasses.replace(
            base.meta, n_cells=len(rows), unit_sizes=sub_sizes
        )
        if hasattr(base, "read_ranges"):  # the cell stream reads a pool in one call
            self.read_ranges = self._read_ranges

    def _read_ranges(self, ranges: list[tuple[int, int]]) -> CellBlock:
        """View rows [a, b) of each range, concatenated: the base rows spanning each range
        in one base ``read_ranges`` call, then the selected rows in one gather (reading the
        pool unit by unit and joining the pieces copied every value once more)."""
        spans, local, at = [], [], 0
        for a, b in ranges:
            if b <= a:
                continue
            rows = self.rows[a:b]  # view row i is base row rows[i] (sorted)
            spans.append((int(rows[0]), int(rows[-1]) + 1))
            local.append(rows - rows[0] + at)
            at += int(rows[-1]) + 1 - int(rows[0])
        block = self.base.read_ranges(spans)
        index = np.concatenate(local) if local else np.zeros(0, dtype=np.int64)
        return block if len(index) == block.n_cells else block.take(index)

    def read_unit(self, unit: int) -> CellBlock:
        u = int(self.units[unit])
        block = self.base.read_unit(u)
        local = self.rows[self._cut[u] : self._cut[u + 1]] - self._unit_start[u]
        return block if len(local) == block.n_cells else block.take(local)

    def read_rows(self, start: int, stop: int) -> CellBlock:
        return rows_of_units(self, self._starts, start, stop)

    def group_index(self) -> pd.DataFrame:
        raise NotImplementedError(
            "a row subset has no group index; pass the rows to SetSampler(rows=...) instead"
        )


def open_row_subset(
    path: str | os.PathLike, rows_file: str | os.PathLike, key: str, **opts
) -> RowSubset:
    """The rows ``key`` of the npz ``rows_file`` (e.g. a run's ``split.npz``) of the store at
    ``path`` (a count store or its latent store)."""
    rows_file = Path(rows_file)
    try:
        with np.load(rows_file) as f:
            rows = f[key]
    except (OSError, KeyError, ValueError) as err:
        raise DataValidationError(
            rows_file, key, f"cannot read the split's rows ({err})",
            "delete the file; the run writes it again from split.file",
        ) from None  # fmt: skip
    return RowSubset(open_store(path, **opts), rows)


def row_subset_factory(
    path: str | os.PathLike, rows_file: str | os.PathLike, key: str, **opts
) -> partial:
    """A picklable reader factory: DataLoader workers reopen the store and reload the rows
    from the file themselves (a split of millions of rows is not pickled into each worker)."""
    return partial(open_row_subset, str(path), str(rows_file), key, **opts)


def split_sources(
    path: str | os.PathLike, rows_file: str | os.PathLike, **opts
) -> tuple[partial, partial | None]:
    """Reader factories of the train and val rows of ``rows_file`` (a ``split.npz``) over the
    store at ``path``; val is None when the split holds no val cells."""
    with np.load(rows_file) as f:
        has_val = len(f["val"]) > 0
    val = row_subset_factory(path, rows_file, "val", **opts) if has_val else None
    return row_subset_factory(path, rows_file, "train", **opts), val
