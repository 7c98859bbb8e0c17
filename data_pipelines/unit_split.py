"""Train/validation split of one store by whole read units, without copying any data.

Streaming only stays fast when whole units (Zarr chunks, WebDataset shards) are read, so a
held-out set made of whole units streams exactly as fast as the training set. The split is
a pure function of (number of units, fraction, seed): every rank and every resumed run
agrees on it. Units hold consecutive rows, so stores written in sample order hold out whole
stretches of a sample: ``cell_split`` holds out cells instead, and ``split_choice`` picks one
of the two (``data.split_by``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial

import numpy as np
import pandas as pd

from .blocks import CellBlock, StoreMeta, StoreReader
from .errors import LatentcellWarning
from .stores import open_store

__all__ = [
    "UnitSubset",
    "held_out_share",
    "open_unit_subset",
    "split_units",
    "subset_factory",
    "warn_lopsided_split",
]


def split_units(n_units: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train units, held-out units), each sorted. At least one unit is held out when
    ``fraction > 0`` and at least one is kept for training."""
    if n_units < 1:
        raise ValueError("the store has no units")
    n_val = 0 if fraction <= 0 else min(n_units - 1, max(1, round(fraction * n_units)))
    if fraction > 0 and n_val == 0:
        raise ValueError(
            f"cannot hold out a validation split from a store with {n_units} unit: "
            "pass a separate validation store (data.val_path) or data.val_fraction=0"
        )
    held = np.random.default_rng([seed, n_units]).permutation(n_units)[:n_val]
    mask = np.zeros(n_units, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def held_out_share(
    group_index: pd.DataFrame, unit_sizes: np.ndarray, val_units: np.ndarray, role: str
) -> pd.DataFrame:
    """Per code of ``role``: its cells and the fraction of them in the held-out units.

    Computed from the group index's row ranges (no cell is read), so it costs the same on a
    thousand cells as on 500M: held-out cells in [0, x) is a piecewise-linear function of x.
    """
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    is_val = np.zeros(len(sizes), dtype=np.int64)
    is_val[np.asarray(val_units, dtype=np.int64)] = 1
    held_before = np.concatenate([[0], np.cumsum(is_val * sizes)])

    def held_below(x: np.ndarray) -> np.ndarray:
        u = np.clip(np.searchsorted(starts, x, side="right") - 1, 0, len(sizes) - 1)
        return held_before[u] + is_val[u] * np.minimum(x - starts[u], sizes[u])

    start, stop = group_index["start"].to_numpy(), group_index["stop"].to_numpy()
    frame = pd.DataFrame(
        {"code": group_index[role].to_numpy(), "cells": stop - start,
         "held": held_below(stop) - held_below(start)}
    ).groupby("code").sum()  # fmt: skip
    frame["share"] = frame["held"] / frame["cells"].clip(lower=1)
    return frame


def warn_lopsided_split(
    reader: StoreReader, val_units: np.ndarray, role: str = "cell_type", limit: float = 0.5
) -> list[str]:
    """Warn (and return the labels) where the held-out units take more than ``limit`` of a
    ``role`` label's cells.

    Stores are sorted by (cell type, perturbation, batch), so a unit-level split of a small
    store can hold out nearly all cells of a small cell type: a model then never sees it.
    """
    column = reader.meta.roles.get(role)
    if column is None or len(val_units) == 0:
        return []
    share = held_out_share(reader.group_index(), reader.meta.unit_sizes, val_units, role)
    labels = reader.meta.categories[column]
    lopsided = share[(share["share"] > limit) & (share.index >= 0)]
    names = [str(labels[int(code)]) for code in lopsided.index]
    if names:
        detail = ", ".join(
            f"{labels[int(c)]!r} {r.share:.0%} of {int(r.cells)}" for c, r in lopsided.iterrows()
        )
        warnings.warn(
            f"{reader.meta.path}: the validation split (data.val_fraction) holds out most "
            f"cells of {column} {detail}: the store is sorted by group, so whole read units "
            "of one group are held out. Fix: split by cells (data.split_by=cells or auto), "
            "or pass a separate validation store (data.val_path), or build the store with "
            "smaller chunks (--chunk-cells).",
            LatentcellWarning,
            stacklevel=2,
        )
    return names


class UnitSubset:
    """A ``StoreReader`` exposing only ``units`` of ``base`` (in the given order).

    Rows of the subset are numbered consecutively for ``read_rows``; the blocks it returns
    keep the base store's global row ids, so cells stay identifiable across splits.
    """

    def __init__(self, base: StoreReader, units: np.ndarray) -> None:
        units = np.asarray(units, dtype=np.int64)
        sizes = np.asarray(base.meta.unit_sizes, dtype=np.int64)
        if len(units) == 0 or units.min() < 0 or units.max() >= len(sizes):
            raise ValueError(f"units must be non-empty indices into {len(sizes)} units")
        self.base = base
        self.units = units
        sub_sizes = sizes[units]
        self._starts = np.concatenate([[0], np.cumsum(sub_sizes)])
        self.meta: StoreMeta = dataclasses.replace(
            base.meta, n_cells=int(sub_sizes.sum()), unit_sizes=sub_sizes
        )

    def read_unit(self, unit: int) -> CellBlock:
        return self.base.read_unit(int(self.units[unit]))

    def read_rows(self, start: int, stop: int) -> CellBlock:
        return rows_of_units(self, self._starts, start, stop)

    def group_index(self) -> pd.DataFrame:
        raise NotImplementedError(
            "a unit subset has no group index; build a separate store for set sampling"
        )


def rows_of_units(view, starts: np.ndarray, start: int, stop: int) -> CellBlock:
    """Rows [start, stop) of a reader view whose unit k holds its rows [starts[k],
    starts[k+1]): the pieces of the units that overlap them (``UnitSubset``, ``RowSubset``)."""
    first = int(np.searchsorted(starts, start, side="right")) - 1
    last = int(np.searchsorted(starts, stop, side="left"))
    blocks = []
    for k in range(max(first, 0), min(last, len(starts) - 1)):
        a = max(start, int(starts[k])) - int(starts[k])
        b = min(stop, int(starts[k + 1])) - int(starts[k])
        if b > a:
            blocks.append(view.read_unit(k).slice(a, b))
    return CellBlock.concat(blocks)


def open_unit_subset(path: str | os.PathLike, units: tuple[int, ...], **opts) -> UnitSubset:
    return UnitSubset(open_store(path, **opts), np.asarray(units, dtype=np.int64))


def subset_factory(path: str | os.PathLike, units: np.ndarray, **opts) -> partial:
    """A picklable reader factory (DataLoader workers reopen the store themselves)."""
    return partial(open_unit_subset, str(path), tuple(int(u) for u in units), **opts)
