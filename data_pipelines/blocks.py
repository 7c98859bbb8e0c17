"""The unit that moves between pipeline stages: a block of cells in CSR form.

Readers, writers, the build step and the loaders all speak ``CellBlock`` so that
no stage needs to know which file format the others use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class CellBlock:
    """``n`` consecutive cells of a store (or of an input file while building).

    X: (n, n_genes) float32 CSR counts in the store's gene order; or, for stores of derived
        per-cell features (``latent_store``: VAE latents), a dense float32 array.
    rows: (n,) int64 global row ids in the store (-1 while not yet placed).
    library_size: (n,) float32, sum of X over the stored genes.
    codes: categorical obs column -> (n,) int32 codes into the store-wide categories.
    numeric: numeric obs column -> (n,) float64 / int64 / bool values.
    names: (n,) str obs names (cell barcodes); may be None when not needed.
    """

    X: sp.csr_matrix | np.ndarray
    rows: np.ndarray
    library_size: np.ndarray
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    names: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def take(self, idx: np.ndarray) -> CellBlock:
        """Rows ``idx`` (any order, repeats allowed) as a new block."""
        X = self.X[idx]
        sorted_csr = getattr(self.X, "has_sorted_indices", False)  # dense X has no indices
        if sorted_csr:  # whole rows keep their order; spares a rescan per batch
            X.has_sorted_indices = True
        return CellBlock(
            X=X,
            rows=self.rows[idx],
            library_size=self.library_size[idx],
            codes={k: v[idx] for k, v in self.codes.items()},
            numeric={k: v[idx] for k, v in self.numeric.items()},
            names=None if self.names is None else self.names[idx],
        )

    def slice(self, a: int, b: int) -> CellBlock:
        """Rows [a, b) as a new block (views of this block's arrays; no gather)."""
        if a == 0 and b == self.n_cells:
            return self
        return CellBlock(
            X=csr_row_slice(self.X, a, b) if sp.isspmatrix_csr(self.X) else self.X[a:b],
            rows=self.rows[a:b],
            library_size=self.library_size[a:b],
            codes={k: v[a:b] for k, v in self.codes.items()},
            numeric={k: v[a:b] for k, v in self.numeric.items()},
            names=None if self.names is None else self.names[a:b],
        )

    @staticmethod
    def concat(blocks: list[CellBlock]) -> CellBlock:
        first = blocks[0]
        if len(blocks) == 1:
            return first
        return CellBlock(
            X=np.concatenate([b.X for b in blocks])
            if isinstance(first.X, np.ndarray)
            else sp.vstack([b.X for b in blocks], format="csr"),
            rows=np.concatenate([b.rows for b in blocks]),
            library_size=np.concatenate([b.library_size for b in blocks]),
            codes={k: np.concatenate([b.codes[k] for b in blocks]) for k in first.codes},
            numeric={k: np.concatenate([b.numeric[k] for b in blocks]) for k in first.numeric},
            names=None if first.names is None else np.concatenate([b.names for b in blocks]),
        )


def csr_row_slice(X: sp.csr_matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows [a, b) of ``X`` whose data and indices are views, not copies.

    Why not ``X[a:b]``: scipy copies both arrays and rescans the indices for sortedness, which
    was a third of the cell stream's time per batch (a pool is sliced into every batch). The
    arrays are set after construction because scipy's constructor copies any view that is
    small beside its base array (``prune``), which is every batch of a pool.
    """
    b = min(b, X.shape[0])  # bounds as Python slices take them
    a = min(a, b)
    lo, hi = int(X.indptr[a]), int(X.indptr[b])
    out = sp.csr_matrix((b - a, X.shape[1]), dtype=X.dtype)
    out.data, out.indices, out.indptr = X.data[lo:hi], X.indices[lo:hi], X.indptr[a : b + 1] - lo
    out.has_sorted_indices = X.has_sorted_indices  # scipy caches the flag; no rescan
    return out


# Roles an obs column can play; the loaders and set sampler address columns by role.
ROLES = ("cell_type", "perturbation", "batch")


@dataclass(frozen=True)
class StoreMeta:
    """Everything about a store except the counts: read once, shared by all loaders."""

    format: str  # "zarr" | "webdataset"
    path: str
    n_cells: int
    n_genes: int
    var: pd.DataFrame  # index = vocabulary key, columns gene_id, gene_symbol (in store order)
    categories: dict[str, list[str]]  # categorical obs column -> categories
    numeric_columns: list[str]
    roles: dict[str, str]  # role ("cell_type", "perturbation", "batch") -> obs column
    control_label: str | None  # the perturbation category of control cells
    unit_sizes: np.ndarray  # cells per read unit (zarr chunk / webdataset shard), in row order
    manifest: dict

    @property
    def obs_columns(self) -> list[str]:
        return list(self.categories) + list(self.numeric_columns)


class StoreReader(Protocol):
    """Read access shared by the Zarr store, the WebDataset shards and the in-memory source.

    A *unit* is the smallest piece read at once (a Zarr cell chunk, a WebDataset shard).
    Units hold consecutive rows: unit k covers rows [unit_starts[k], unit_starts[k+1]).
    """

    meta: StoreMeta

    def read_unit(self, unit: int) -> CellBlock: ...

    def read_rows(self, start: int, stop: int) -> CellBlock:
        """Rows [start, stop); efficient for contiguous ranges (the set sampler's access)."""
        ...

    def group_index(self) -> pd.DataFrame:
        """One row per contiguous row range of a (cell_type, perturbation, batch) group.

        Columns: the three role names (int32 codes, -1 where the store has no such column),
        ``start``, ``stop``. Each input file is written sorted by group, so a group is one
        range per input file that holds it (usually exactly one range).
        """
        ...


@dataclass(frozen=True)
class StoreSpec:
    """What a writer needs to know before the first block arrives.

    var: index named ``gene_key`` (the vocabulary key), columns ``gene_id`` and ``gene_symbol``
        (strings; "" where unknown), in store gene order.
    categories: categorical obs column -> categories (store-wide; block codes index into these).
        Always includes ``_source_file`` (the input paths).
    numeric_dtypes: numeric obs column -> numpy dtype string. Always includes ``_source_row``.
    roles: role -> obs column or None (see ROLES).
    """

    var: pd.DataFrame
    categories: dict[str, list[str]]
    numeric_dtypes: dict[str, str]
    roles: dict[str, str | None]
    control_label: str | None
    inputs: list[dict]
    build_options: dict


class StoreWriter(Protocol):
    """Receives blocks in final row order and publishes the store atomically.

    Writers build in a temporary sibling path; ``finish`` writes the manifest (counts,
    checksums, the group ranges computed from the role codes it saw) and renames into place.
    ``abort`` removes the temporary path; on any exception the destination is untouched.
    Use as a context manager: leaving the ``with`` block by an exception aborts.
    """

    def append(self, block: CellBlock) -> None: ...

    def finish(self) -> str: ...

    def abort(self) -> None: ...
