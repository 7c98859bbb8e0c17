"""Which validation split a stage holds out of its store: whole read units or cells.

``data.split_by``:

- ``"units"``: whole read units (``unit_split``), which stream as fast as training; refused
  when it leaves a label of a stratify column with no training cell;
- ``"cells"``: cells, stratified by the stratify columns (``cell_split``);
- ``"auto"`` (default): cells when the store has fewer than ``MIN_UNITS`` read units, or when
  the unit split would hold out more than ``MOST`` of the cells of some label of a stratify
  column (always the case when it holds out all of them); else units. Stores are sorted by
  group, so a unit split of a small store holds out whole groups; a large store with small
  units keeps every label in training and streams faster.

The labels a unit split holds out are counted from the group index for role columns (no cell
is read); another column's codes are read from the store, unit by unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .blocks import StoreReader
from .cell_split import resolve_columns, stratified_cell_split
from .errors import DataValidationError
from .row_subset import rows_digest
from .unit_split import held_out_share, split_units, warn_lopsided_split

__all__ = ["MIN_UNITS", "MOST", "SPLIT_BY", "ChosenSplit", "choose_split", "label_shares"]

SPLIT_BY = ("auto", "units", "cells")
MIN_UNITS = 100  # fewer read units than this: a unit split is too coarse
MOST = 0.5  # a unit split holding out more of a label's cells than this is lopsided


@dataclass(frozen=True)
class ChosenSplit:
    """The split and why: ``train`` / ``val`` are read units (by="units") or store rows
    (by="cells"), sorted int64."""

    by: str
    reason: str
    columns: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    n_train_cells: int
    n_val_cells: int

    def line(self) -> str:
        """The console line saying which split was chosen and why."""
        what = "read units" if self.by == "units" else "cells"
        parts = f" ({len(self.train):,} / {len(self.val):,} units)" if self.by == "units" else ""
        strat = ""
        if self.by == "cells":
            strat = (
                f", stratified by {', '.join(self.columns)}" if self.columns else ", unstratified"
            )
        return (
            f"validation split: by {what}{strat} ({self.reason}): {self.n_train_cells:,} "
            f"training / {self.n_val_cells:,} validation cells{parts}"
        )

    def record(self) -> dict:
        """What a run keeps of it (model card, ``val_split.json``)."""
        return {
            "by": self.by,
            "reason": self.reason,
            "stratify": list(self.columns),
            "n_train_cells": self.n_train_cells,
            "n_val_cells": self.n_val_cells,
            "train_sha256": rows_digest(self.train),  # of the units or the rows
        }


def choose_split(
    reader: StoreReader, split_by: str, columns: Sequence[str], fraction: float, seed: int
) -> ChosenSplit:
    """The validation split of ``reader``'s store (see the module docstring); ``columns``:
    the stratify columns or role names (() = the store's roles)."""
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    meta = reader.meta
    columns = resolve_columns(meta, columns)
    n_units = len(meta.unit_sizes)
    if split_by == "cells":
        return _cells(reader, columns, fraction, seed, "data.split_by=cells")
    if split_by == "auto" and n_units < MIN_UNITS:
        return _cells(reader, columns, fraction, seed,
                      f"split_by=auto: the store has {n_units} read units, fewer than "
                      f"{MIN_UNITS}")  # fmt: skip
    if n_units < 2:
        raise DataValidationError(
            meta.path, "data.split_by", f"the store has {meta.n_cells} cells in {n_units} "
            "read unit, too few to hold whole units out", "set data.split_by=cells",
        )  # fmt: skip
    train, val = split_units(n_units, fraction, seed)
    shares = {c: label_shares(reader, c, val) for c in columns}
    if split_by == "units":
        lost = {c: _labels(meta, c, s[s["held"] == s["cells"]].index) for c, s in shares.items()}
        lost = {c: labels for c, labels in lost.items() if labels}
        if lost:
            said = "; ".join(f"{c} {_preview(labels)}" for c, labels in lost.items())
            raise DataValidationError(
                meta.path, "data.split_by",
                f"the split by read units (split_by=units, val_fraction={fraction}, "
                f"split_seed={seed}) leaves no training cell of {said}",
                "set data.split_by=cells (or auto), or pass a separate validation store "
                "(data.val_path)",
            )  # fmt: skip
        warn_lopsided_split(reader, val)
        return _units(meta, columns, train, val, "data.split_by=units")
    worst = max(
        ((s.loc[code, "share"], c, code) for c, s in shares.items() for code in s.index),
        default=(0.0, "", 0),
    )
    share, column, code = worst
    if share > MOST:
        label = _labels(meta, column, [code])[0]
        cells = int(shares[column].loc[code, "cells"])
        return _cells(reader, columns, fraction, seed,
                      f"split_by=auto: a split by read units would hold out {share:.0%} of "
                      f"{column} {label!r} ({cells:,} cells)")  # fmt: skip
    return _units(meta, columns, train, val,
                  f"split_by=auto: {n_units} read units, at most {share:.0%} of any label of "
                  f"{', '.join(columns) or 'the store'} held out")  # fmt: skip


def label_shares(reader: StoreReader, column: str, val_units: np.ndarray) -> pd.DataFrame:
    """Per code of ``column`` with cells (missing values, code -1, left out): its cells, the
    cells in ``val_units`` and their share; from the group index for a role column."""
    meta = reader.meta
    role = next((r for r, c in meta.roles.items() if c == column), None)
    if role is not None:
        try:
            share = held_out_share(reader.group_index(), meta.unit_sizes, val_units, role)
            return share[(share.index >= 0) & (share["cells"] > 0)]
        except NotImplementedError:
            pass
    size = len(meta.categories[column]) + 1  # code -1 counted at 0
    cells, held = np.zeros(size, np.int64), np.zeros(size, np.int64)
    is_val = np.zeros(len(meta.unit_sizes), dtype=bool)
    is_val[np.asarray(val_units, dtype=np.int64)] = True
    for unit in range(len(meta.unit_sizes)):
        counts = np.bincount(reader.read_unit(unit).codes[column] + 1, minlength=size)
        cells += counts
        if is_val[unit]:
            held += counts
    frame = pd.DataFrame({"cells": cells[1:], "held": held[1:]})
    frame["share"] = frame["held"] / frame["cells"].clip(lower=1)
    return frame[frame["cells"] > 0]


def _labels(meta, column: str, codes) -> list[str]:
    return [str(meta.categories[column][int(code)]) for code in codes]


def _preview(labels: list[str], limit: int = 10) -> str:
    more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
    return f"{labels[:limit]}{more}"


def _units(meta, columns, train, val, reason: str) -> ChosenSplit:
    sizes = np.asarray(meta.unit_sizes, dtype=np.int64)
    return ChosenSplit("units", reason, tuple(columns), train, val,
                       int(sizes[train].sum()), int(sizes[val].sum()))  # fmt: skip


def _cells(reader, columns, fraction: float, seed: int, reason: str) -> ChosenSplit:
    train, val = stratified_cell_split(reader, columns, fraction, seed)
    if fraction > 0 and len(val) == 0:
        raise DataValidationError(
            reader.meta.path, "data.val_fraction",
            f"at val_fraction={fraction}, no stratum of {', '.join(columns) or 'the store'} "
            f"in its {reader.meta.n_cells:,} cells is large enough to hold a cell out (a "
            "stratum of n cells holds out round(val_fraction * n), keeping one)",
            "raise data.val_fraction, stratify by fewer columns (data.stratify), pass a "
            "separate validation store (data.val_path) or set data.val_fraction=0",
        )  # fmt: skip
    return ChosenSplit("cells", reason, tuple(columns), train, val, len(train), len(val))
