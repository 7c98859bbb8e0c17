"""Train/validation split of one store by whole read units, without copying any data.

Streaming only stays fast when whole units (Zarr chunks, WebDataset shards) are read, so a
held-out set made of whole units streams exactly as fast as the training set. The split is
a pure function of (number of units, fraction, seed): every rank and every resumed run
agrees on it. Units hold consecutive rows, so stores written in sample order hold out whole
stretches of a sample; use a separate validation store (``data.val_path``) when the split
must follow another rule.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import numpy as np
import pandas as pd

from .blocks import CellBlock, StoreMeta, StoreReader
from .stores import open_store

__all__ = ["UnitSubset", "open_unit_subset", "split_units", "subset_factory"]


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
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left"))
        blocks = []
        for k in range(max(first, 0), min(last, len(self.units))):
            a = max(start, int(self._starts[k])) - int(self._starts[k])
            b = min(stop, int(self._starts[k + 1])) - int(self._starts[k])
            if b > a:
                blocks.append(self.read_unit(k).slice(a, b))
        return CellBlock.concat(blocks)

    def group_index(self) -> pd.DataFrame:
        raise NotImplementedError(
            "a unit subset has no group index; build a separate store for set sampling"
        )


def open_unit_subset(path: str | os.PathLike, units: tuple[int, ...], **opts) -> UnitSubset:
    return UnitSubset(open_store(path, **opts), np.asarray(units, dtype=np.int64))


def subset_factory(path: str | os.PathLike, units: np.ndarray, **opts) -> partial:
    """A picklable reader factory (DataLoader workers reopen the store themselves)."""
    return partial(open_unit_subset, str(path), tuple(int(u) for u in units), **opts)
