"""Train/validation split of one store by cells, stratified by the run's conditions.

A split by whole read units (``unit_split``) fails on a small store: with 1,090 cells in
1,000-cell chunks, sorted by cell type, holding out one unit held out 4 of 5 cell types. This
split holds out cells instead, within every stratum:

- strata: the combinations of the codes of ``columns`` (categorical obs columns, or role
  names) per row; no column = one stratum;
- per stratum of n cells, its rows (in store order) are permuted by a generator seeded from
  (seed, the stratum's codes), and the first ``round(fraction * n)`` are held out, at most
  n - 1: every stratum keeps a training cell (a 1-cell stratum trains);
- codes come from the group index's row ranges when every column is a role (no cell is
  read), else from the store, unit by unit.

The split depends only on (per-row codes, fraction, seed): the count store and its latent
store, which mirrors the count store's rows and obs codes, give the same rows whichever way
their codes are read, so the VAE and the DiT validate on the same cells. Rows are streamed
through ``row_subset.RowSubset`` (exact resume: the stream's layout carries their digest).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from .blocks import StoreMeta, StoreReader
from .errors import DataValidationError

__all__ = ["default_columns", "resolve_columns", "stratified_cell_split", "strata"]

_TAG = 0xCE11  # keeps these generators apart from other seeded uses of split_seed


def default_columns(meta: StoreMeta) -> tuple[str, ...]:
    """The store's categorical role columns (cell_type, perturbation, batch) that exist."""
    return tuple(sorted({c for c in meta.roles.values() if c and c in meta.categories}))


def resolve_columns(meta: StoreMeta, names: Sequence[str]) -> tuple[str, ...]:
    """Obs columns of ``names`` (columns or role names), sorted, once each; no names = the
    store's roles. Sorted, so the order names are given in never changes the split."""
    if not names:
        return default_columns(meta)
    out = set()
    for name in names:
        column = name if name in meta.categories else meta.roles.get(name)
        if not column or column not in meta.categories:
            available = sorted(c for c in meta.categories if not c.startswith("_"))
            raise DataValidationError(
                meta.path, "data.stratify",
                f"{name!r} is not a categorical obs column (or role) of the store",
                f"use one of {available}, or [] for its roles",
            )  # fmt: skip
        out.add(column)
    return tuple(sorted(out))


def strata(reader: StoreReader, columns: Sequence[str]) -> Iterator[tuple[tuple, np.ndarray]]:
    """(codes of the stratum, its rows ascending) per stratum, strata in sorted code order."""
    n = reader.meta.n_cells
    if not columns:
        yield (), np.arange(n, dtype=np.int64)
        return
    ranges = _role_ranges(reader, columns)
    if ranges is not None:
        keys, starts, stops = ranges
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")  # ranges by stratum, each in store order
        cuts = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
        for key, sel in zip(uniq, np.split(order, cuts), strict=True):
            rows = [np.arange(starts[i], stops[i], dtype=np.int64) for i in sel]
            yield tuple(int(c) for c in key), np.concatenate(rows)
        return
    codes = _read_codes(reader, columns)
    uniq, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable").astype(np.int64)  # rows by stratum, ascending
    cuts = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    for key, rows in zip(uniq, np.split(order, cuts), strict=True):
        yield tuple(int(c) for c in key), rows


def stratified_cell_split(
    reader: StoreReader, columns: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of the store, sorted int64 (see the module docstring).
    ``columns``: obs columns or role names; () = the store's roles."""
    columns = resolve_columns(reader.meta, columns)
    n = reader.meta.n_cells
    held = []
    for key, rows in strata(reader, columns):
        n_val = min(len(rows) - 1, math.floor(fraction * len(rows) + 0.5))
        if n_val > 0:
            rng = np.random.default_rng([seed, _TAG, *(c + 1 for c in key)])
            held.append(rows[rng.permutation(len(rows))[:n_val]])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).astype(np.int64), val.astype(np.int64)


def _role_ranges(reader: StoreReader, columns: Sequence[str]):
    """(per-range codes (r, k), starts, stops) from the group index when every column is a
    role and the ranges tile the store; None otherwise (a latent store has no index)."""
    role_of = {c: r for r, c in reader.meta.roles.items() if c}
    if not all(c in role_of for c in columns):
        return None
    try:
        index = reader.group_index()
    except NotImplementedError:
        return None
    index = index.sort_values("start", kind="stable")
    starts = index["start"].to_numpy(np.int64)
    stops = index["stop"].to_numpy(np.int64)
    n = reader.meta.n_cells
    if len(starts) == 0 or starts[0] != 0 or stops[-1] != n or (starts[1:] != stops[:-1]).any():
        return None
    keys = np.stack([index[role_of[c]].to_numpy(np.int64) for c in columns], axis=1)
    return keys, starts, stops


def _read_codes(reader: StoreReader, columns: Sequence[str]) -> np.ndarray:
    """Per-row codes (n, k) of ``columns``, read unit by unit."""
    codes = np.empty((reader.meta.n_cells, len(columns)), dtype=np.int64)
    for unit in range(len(reader.meta.unit_sizes)):
        block = reader.read_unit(unit)
        for j, column in enumerate(columns):
            codes[block.rows, j] = block.codes[column]
    return codes
