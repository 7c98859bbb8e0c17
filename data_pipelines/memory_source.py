"""A store held in memory: the same ``StoreReader`` interface as the Zarr and WebDataset stores.

Uses: the numpy-in-memory upper bound in the storage benchmark, small datasets that fit in
RAM (``InMemoryStore.from_reader`` loads a whole store), AnnData objects built in a notebook
(``InMemoryStore.from_anndata``), and the loader tests, which need a real reader with
real read units but no files.

Units are ``unit_cells`` consecutive rows (the last one may be shorter), so loaders see the
same unit structure they would see on disk. Reads return CSR views of the arrays where
possible: reading is an index computation, not a copy of the counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .blocks import ROLES, CellBlock, StoreMeta
from .errors import DataValidationError

MEMORY_PATH = "<memory>"


def compute_group_index(role_codes: Mapping[str, np.ndarray | None], n_cells: int) -> pd.DataFrame:
    """Contiguous row ranges of identical (cell_type, perturbation, batch) codes.

    A new range starts wherever any role code differs from the previous row; a missing role
    column counts as code -1 everywhere. This is the group index writers publish, computed
    from the codes in row order (a group split across input files yields one range per run).
    """
    cols = {}
    for role in ROLES:
        codes = role_codes.get(role)
        cols[role] = (
            np.full(n_cells, -1, dtype=np.int32) if codes is None else np.asarray(codes, np.int32)
        )
    if n_cells == 0:
        frame = {r: np.zeros(0, np.int32) for r in ROLES}
        return pd.DataFrame(
            {**frame, "start": np.zeros(0, np.int64), "stop": np.zeros(0, np.int64)}
        )
    change = np.zeros(n_cells, dtype=bool)
    change[0] = True
    for codes in cols.values():
        change[1:] |= codes[1:] != codes[:-1]
    starts = np.flatnonzero(change).astype(np.int64)
    stops = np.append(starts[1:], n_cells).astype(np.int64)
    frame = {r: cols[r][starts] for r in ROLES}
    return pd.DataFrame({**frame, "start": starts, "stop": stops})


class InMemoryStore:
    """A ``StoreReader`` over a CSR matrix and obs arrays held in memory.

    X: (n_cells, n_genes) CSR counts (converted to float32 CSR with int32 indices).
    codes / categories: categorical obs columns as int codes into ``categories[col]``.
    numeric: numeric obs columns.
    var: gene table (index = vocabulary key; columns gene_id, gene_symbol); default gene_i.
    roles: role -> categorical column (see ``blocks.ROLES``); control_label: the control
        perturbation category.
    unit_cells: cells per read unit; ``unit_sizes`` gives an explicit unit layout instead
        (``from_reader`` uses it to copy the source store's layout).
    """

    def __init__(
        self,
        X: sp.spmatrix | sp.sparray | np.ndarray,
        *,
        codes: Mapping[str, np.ndarray] | None = None,
        categories: Mapping[str, Sequence[str]] | None = None,
        numeric: Mapping[str, np.ndarray] | None = None,
        var: pd.DataFrame | None = None,
        roles: Mapping[str, str | None] | None = None,
        control_label: str | None = None,
        unit_cells: int = 1000,
        unit_sizes: Sequence[int] | None = None,
        names: np.ndarray | None = None,
        path: str = MEMORY_PATH,
    ):
        self.path = path
        self.X = _as_csr32(X)
        n_cells, n_genes = self.X.shape
        self.codes = {k: np.asarray(v, dtype=np.int32) for k, v in (codes or {}).items()}
        categories = {k: [str(c) for c in v] for k, v in (categories or {}).items()}
        self.numeric = {k: np.asarray(v) for k, v in (numeric or {}).items()}
        self.names = None if names is None else np.asarray(names)
        self.library_size = np.asarray(self.X.sum(axis=1), dtype=np.float32).ravel()
        self._validate_obs(n_cells, categories)
        roles = {r: c for r, c in (roles or {}).items() if c}
        self._validate_roles(roles, categories, control_label)
        unit_sizes = _unit_sizes(n_cells, unit_cells, unit_sizes, path)
        self.unit_starts = np.concatenate([[0], np.cumsum(unit_sizes)]).astype(np.int64)
        self.meta = StoreMeta(
            format="memory",
            path=path,
            n_cells=n_cells,
            n_genes=n_genes,
            var=_default_var(var, n_genes),
            categories=categories,
            numeric_columns=list(self.numeric),
            roles={r: roles.get(r) for r in ROLES},
            control_label=control_label,
            unit_sizes=unit_sizes,
            manifest={
                "format": "memory",
                "n_cells": n_cells,
                "n_genes": n_genes,
                "nnz": int(self.X.nnz),
                "chunk_cells": int(unit_sizes.max()) if len(unit_sizes) else unit_cells,
            },
        )
        self._group_index: pd.DataFrame | None = None

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_obs(
        cls,
        X,
        obs: pd.DataFrame,
        *,
        var: pd.DataFrame | None = None,
        roles: Mapping[str, str | None] | None = None,
        control_label: str | None = None,
        unit_cells: int = 1000,
        path: str = MEMORY_PATH,
    ) -> InMemoryStore:
        """From an obs table: categorical/string/object columns become codes, numbers stay numeric.

        The obs index becomes the cell names.
        """
        codes, categories, numeric = {}, {}, {}
        for col in obs.columns:
            values = obs[col]
            if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
                numeric[col] = values.to_numpy()
            else:
                cat = values.astype("category")
                codes[col] = cat.cat.codes.to_numpy()
                categories[col] = [str(c) for c in cat.cat.categories]
        return cls(
            X,
            codes=codes,
            categories=categories,
            numeric=numeric,
            var=var,
            roles=roles,
            control_label=control_label,
            unit_cells=unit_cells,
            names=obs.index.to_numpy().astype(str),
            path=path,
        )

    @classmethod
    def from_anndata(
        cls,
        adata,
        *,
        roles: Mapping[str, str | None] | None = None,
        control_label: str | None = None,
        unit_cells: int = 1000,
        layer: str | None = None,
        gene_id_column: str | None = "gene_id",
        sort_by_group: bool = False,
        path: str | None = None,
    ) -> InMemoryStore:
        """From an in-memory AnnData (counts in ``X`` or ``layers[layer]``).

        var: the var names are the vocabulary key and gene symbol; ``gene_id_column`` (if
        present in var) gives gene ids. ``sort_by_group`` orders rows by role codes as the
        store writers do, so each group is one contiguous range for the set sampler.
        """
        X = adata.X if layer is None else adata.layers[layer]
        var_names = adata.var_names.astype(str)
        gene_id = (
            adata.var[gene_id_column].astype(str).to_numpy()
            if gene_id_column and gene_id_column in adata.var
            else np.full(len(var_names), "", dtype=object)
        )
        var = pd.DataFrame(
            {"gene_id": gene_id, "gene_symbol": var_names.to_numpy()},
            index=pd.Index(var_names, name="gene_key"),
        )
        store = cls.from_obs(
            X,
            adata.obs,
            var=var,
            roles=roles,
            control_label=control_label,
            unit_cells=unit_cells,
            path=path or str(getattr(adata, "filename", None) or MEMORY_PATH),
        )
        return store.sorted_by_group() if sort_by_group else store

    @classmethod
    def from_reader(cls, reader, unit_cells: int | None = None) -> InMemoryStore:
        """Load a whole store into memory; keeps the source's unit layout unless given."""
        meta = reader.meta
        n_units = len(meta.unit_sizes)
        block = (
            CellBlock.concat([reader.read_unit(k) for k in range(n_units)])
            if n_units
            else reader.read_rows(0, 0)
        )
        return cls(
            block.X,
            codes=block.codes,
            categories=meta.categories,
            numeric=block.numeric,
            var=meta.var,
            roles=meta.roles,
            control_label=meta.control_label,
            unit_cells=unit_cells or 1000,
            unit_sizes=None if unit_cells else meta.unit_sizes,
            names=block.names,
            path=meta.path,
        )

    def sorted_by_group(self) -> InMemoryStore:
        """A copy with rows stably sorted by (cell_type, perturbation, batch) codes."""
        n = self.meta.n_cells
        keys = [self._role_codes(r) for r in reversed(ROLES)]
        keys = [k if k is not None else np.zeros(n, np.int32) for k in keys]
        order = np.lexsort(keys) if n else np.zeros(0, np.int64)
        block = self._block(order)
        return InMemoryStore(
            block.X,
            codes=block.codes,
            categories=self.meta.categories,
            numeric=block.numeric,
            var=self.meta.var,
            roles=self.meta.roles,
            control_label=self.meta.control_label,
            unit_sizes=self.meta.unit_sizes,
            names=block.names,
            path=self.path,
        )

    # -- StoreReader ------------------------------------------------------------------------

    def read_unit(self, unit: int) -> CellBlock:
        if not 0 <= unit < len(self.meta.unit_sizes):
            raise IndexError(f"unit {unit} out of range [0, {len(self.meta.unit_sizes)})")
        return self.read_rows(int(self.unit_starts[unit]), int(self.unit_starts[unit + 1]))

    def read_rows(self, start: int, stop: int) -> CellBlock:
        """Rows [start, stop): read-only CSR views of the counts (no copy); do not modify."""
        n = self.meta.n_cells
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) out of range [0, {n}]")
        indptr = self.X.indptr[start : stop + 1]
        lo, hi = indptr[0], indptr[-1]
        X = _csr_view(
            self.X.data[lo:hi],
            self.X.indices[lo:hi],
            indptr - lo,
            (stop - start, self.meta.n_genes),
        )
        return CellBlock(
            X=X,
            rows=np.arange(start, stop, dtype=np.int64),
            library_size=self.library_size[start:stop],
            codes={k: v[start:stop] for k, v in self.codes.items()},
            numeric={k: v[start:stop] for k, v in self.numeric.items()},
            names=None if self.names is None else self.names[start:stop],
        )

    def group_index(self) -> pd.DataFrame:
        if self._group_index is None:
            role_codes = {r: self._role_codes(r) for r in ROLES}
            self._group_index = compute_group_index(role_codes, self.meta.n_cells)
        return self._group_index.copy()

    # -- internals --------------------------------------------------------------------------

    def _role_codes(self, role: str) -> np.ndarray | None:
        column = self.meta.roles.get(role)
        return None if column is None else self.codes[column]

    def _block(self, idx: np.ndarray) -> CellBlock:
        return CellBlock(
            X=self.X[idx],
            rows=np.asarray(idx, dtype=np.int64),
            library_size=self.library_size[idx],
            codes={k: v[idx] for k, v in self.codes.items()},
            numeric={k: v[idx] for k, v in self.numeric.items()},
            names=None if self.names is None else self.names[idx],
        )

    def _validate_obs(self, n_cells: int, categories: dict[str, list[str]]) -> None:
        for col, values in {**self.codes, **self.numeric}.items():
            if len(values) != n_cells:
                raise DataValidationError(
                    self.path,
                    f"obs/{col}",
                    f"{len(values)} values for {n_cells} cells",
                    "give one value per cell",
                )
        for col, codes in self.codes.items():
            if col not in categories:
                raise DataValidationError(
                    self.path, f"obs/{col}", "codes given without categories", "pass categories"
                )
            if len(codes) and (codes.min() < -1 or codes.max() >= len(categories[col])):
                raise DataValidationError(
                    self.path,
                    f"obs/{col}",
                    "codes outside [-1, n_categories)",
                    "use codes into categories (-1 for missing)",
                )
        missing = [c for c in categories if c not in self.codes]
        if missing:
            raise DataValidationError(
                self.path, f"obs/{missing[0]}", "categories given without codes", "pass codes"
            )
        if self.names is not None and len(self.names) != n_cells:
            raise DataValidationError(
                self.path, "obs/_names", "wrong length", "give one name per cell"
            )

    def _validate_roles(
        self, roles: dict[str, str], categories: dict[str, list[str]], control_label: str | None
    ) -> None:
        for role, col in roles.items():
            if role not in ROLES:
                raise DataValidationError(
                    self.path, "roles", f"unknown role {role!r}", f"use one of {ROLES}"
                )
            if col not in categories:
                raise DataValidationError(
                    self.path,
                    f"roles/{role}",
                    f"column {col!r} is not a categorical obs column",
                    f"use one of {sorted(categories)}",
                )
        if control_label is not None:
            pert = roles.get("perturbation")
            if pert is None or control_label not in categories[pert]:
                raise DataValidationError(
                    self.path,
                    "control_label",
                    f"{control_label!r} is not a category of the perturbation column {pert!r}",
                    "set roles['perturbation'] and a control label that occurs in it",
                )


def _csr_view(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape) -> sp.csr_matrix:
    """A CSR matrix over views of the store's arrays, made read-only.

    scipy's constructor copies ("prunes") any view much smaller than its base array, which
    would turn every read into a copy of the counts; assigning the arrays after building an
    empty matrix skips that. The store's arrays are canonical (sorted, no duplicates), so the
    lazily computed format flags stay correct.
    """
    X = sp.csr_matrix(shape, dtype=np.float32)
    for view in (data, indices):
        view.flags.writeable = False
    X.data, X.indices, X.indptr = data, indices, indptr.astype(indices.dtype, copy=False)
    return X


def _as_csr32(X) -> sp.csr_matrix:
    """float32 CSR, canonical (sorted, summed) entries, int32 index arrays where they fit.

    indptr and indices share one dtype: scipy otherwise upcasts both on every row read.
    """
    X = sp.csr_matrix(X, dtype=np.float32)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    small = X.nnz < np.iinfo(np.int32).max and X.shape[1] < np.iinfo(np.int32).max
    index_dtype = np.int32 if small else np.int64
    X.indices = X.indices.astype(index_dtype, copy=False)
    X.indptr = X.indptr.astype(index_dtype, copy=False)
    return X


def _unit_sizes(
    n_cells: int, unit_cells: int, unit_sizes: Sequence[int] | None, path: str
) -> np.ndarray:
    if unit_sizes is not None:
        sizes = np.asarray(unit_sizes, dtype=np.int64)
        if sizes.sum() != n_cells or (sizes <= 0).any():
            raise DataValidationError(
                path,
                "unit_sizes",
                f"sizes sum to {sizes.sum()} for {n_cells} cells",
                "give positive sizes summing to n_cells",
            )
        return sizes
    if unit_cells < 1:
        raise DataValidationError(path, "unit_cells", f"{unit_cells} < 1", "use unit_cells >= 1")
    n_units = -(-n_cells // unit_cells)
    sizes = np.full(n_units, unit_cells, dtype=np.int64)
    if n_units:
        sizes[-1] = n_cells - unit_cells * (n_units - 1)
    return sizes


def _default_var(var: pd.DataFrame | None, n_genes: int) -> pd.DataFrame:
    if var is not None:
        if len(var) != n_genes:
            raise ValueError(f"var has {len(var)} rows for {n_genes} genes")
        return var
    keys = [f"gene_{i}" for i in range(n_genes)]
    return pd.DataFrame(
        {"gene_id": [""] * n_genes, "gene_symbol": keys}, index=pd.Index(keys, name="gene_key")
    )
