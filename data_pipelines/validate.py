"""Value checks on count blocks, run on every block as it streams past (nothing is re-read).

Only stored entries are inspected (implicit zeros are valid counts), so a check costs a few
vectorised passes over ``data``. Errors name the file, the field ``X``, the first offending
cell (obs name and row in the input) and gene, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError


@dataclass(frozen=True)
class BlockContext:
    """Where a block came from, so an error can point at the offending cell and gene.

    rows: input row of each block row; obs_names / gene_names: the input's full name arrays.
    """

    path: str
    rows: np.ndarray
    obs_names: np.ndarray
    gene_names: np.ndarray


def check_counts(X: sp.csr_matrix, ctx: BlockContext, integer: bool = True) -> None:
    """Raise on NaN/inf, negative values, or (``integer``) non-integer values in ``X``."""
    data = X.data
    if data.dtype.kind in "iu":
        bad = data < 0 if data.dtype.kind == "i" else None
        if bad is not None and bad.any():
            _raise(X, ctx, bad, "negative count", "X must hold raw non-negative counts")
        return
    finite = np.isfinite(data)
    if not finite.all():
        _raise(X, ctx, ~finite, "NaN or infinite value", "replace NaN/inf or drop those cells")
    negative = data < 0
    if negative.any():
        _raise(X, ctx, negative, "negative value", "X must hold raw counts, not scaled data")
    if integer:
        fractional = data != np.floor(data)
        if fractional.any():
            _raise(
                X,
                ctx,
                fractional,
                "non-integer value where counts are expected",
                "put raw integer counts in X (e.g. from adata.raw or a counts layer)",
            )


def _raise(X: sp.csr_matrix, ctx: BlockContext, bad: np.ndarray, problem: str, fix: str):
    """Point at the offending entry of the lowest input row: row, obs name, gene, value."""
    entries = np.flatnonzero(bad)
    block_rows = np.searchsorted(X.indptr, entries, side="right") - 1
    first = int(np.argmin(ctx.rows[block_rows]))  # stable: first entry of that row
    entry, row = int(entries[first]), int(ctx.rows[block_rows[first]])
    gene = int(X.indices[entry])
    raise DataValidationError(
        ctx.path,
        "X",
        f"{problem} {X.data[entry].item()!r} at row {row} (obs {str(ctx.obs_names[row])!r}), "
        f"column {gene} (gene {str(ctx.gene_names[gene])!r})",
        fix,
    )
