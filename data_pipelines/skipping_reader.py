"""``data.on_corrupt = "skip"``: damaged units become placeholder cells the losses never see.

A loader plans its epochs from the unit sizes (how many batches each rank gets, where a
resume starts), so a damaged unit cannot simply vanish: ranks would disagree on the number of
batches and hang. ``SkippingReader`` returns, in place of a unit or row range that raises
``CorruptDataError``, placeholder cells of the same count: no counts, library size 1, code 0,
and row ``-1``. The loaders mark every row ``< 0`` as ``is_pad``, which every model drops
from its loss and metrics (the pad contract of ``batches``), so nothing is trained on them,
and the epoch plan, resume and batch counts are unchanged.

Each damaged file is recorded once per process; ``drain()`` hands the new records to the
loader, which attaches them to the next item it yields, so the records cross DataLoader
worker processes with the data and reach the main process's ``StreamLoader``.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .blocks import CellBlock, StoreReader
from .errors import CorruptDataError

__all__ = ["SkippingReader", "SKIPPED_KEY", "placeholder_block"]

SKIPPED_KEY = "_skipped_units"  # item key: {file: problem} of units skipped since the last item


def placeholder_block(reader: StoreReader, n: int) -> CellBlock:
    """``n`` cells that stand in for damaged ones (row -1: the loaders pad them out)."""
    meta = reader.meta
    dense = meta.format == "latent"
    numeric = meta.manifest.get("obs", {}).get("numeric", {})
    return CellBlock(
        X=np.zeros((n, meta.n_genes), np.float32)
        if dense
        else sp.csr_matrix((n, meta.n_genes), dtype=np.float32),
        rows=np.full(n, -1, dtype=np.int64),
        library_size=np.ones(n, dtype=np.float32),
        codes={c: np.zeros(n, np.int32) for c in meta.categories},
        numeric={c: np.zeros(n, numeric.get(c, "float64")) for c in meta.numeric_columns},
        names=None,
    )


class SkippingReader:
    """A ``StoreReader`` whose damaged units read as placeholders (see the module docstring)."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader
        self.meta = reader.meta
        self.skipped: dict[str, str] = {}
        self._new: dict[str, str] = {}
        self._lock = threading.Lock()  # the cell stream builds pools on several threads
        # the one-block reads the cell stream prefers, where the wrapped reader has them
        if hasattr(reader, "read_ranges"):
            self.read_ranges = self._read_ranges
        if hasattr(reader, "read_units"):
            self.read_units = self._read_units

    def _record(self, err: CorruptDataError) -> None:
        with self._lock:
            if err.path not in self.skipped:
                problem = f"{err.field}: {err.problem}"
                self.skipped[err.path] = problem
                self._new[err.path] = problem

    def drain(self) -> dict[str, str]:
        """Damaged files found since the last call: {file: problem}."""
        with self._lock:
            new, self._new = self._new, {}
        return new

    def _read_ranges(self, ranges: list[tuple[int, int]]) -> CellBlock:
        """All ranges at once; if one is damaged, range by range (placeholders for those)."""
        try:
            return self.reader.read_ranges(ranges)
        except CorruptDataError:
            return CellBlock.concat([self.read_rows(a, b) for a, b in ranges])

    def _read_units(self, units) -> CellBlock:
        try:
            return self.reader.read_units(units)
        except CorruptDataError:
            return CellBlock.concat([self.read_unit(int(u)) for u in units])

    def read_unit(self, unit: int) -> CellBlock:
        try:
            return self.reader.read_unit(unit)
        except CorruptDataError as err:
            self._record(err)
            return placeholder_block(self.reader, int(self.meta.unit_sizes[unit]))

    def read_rows(self, start: int, stop: int) -> CellBlock:
        try:
            return self.reader.read_rows(start, stop)
        except CorruptDataError as err:
            self._record(err)
            return placeholder_block(self.reader, stop - start)

    def group_index(self) -> pd.DataFrame:
        return self.reader.group_index()
