"""The two count matrices of a CITE-seq-style h5ad, read and checked: RNA counts in ``X`` and
protein (antibody-derived tag) counts in ``obsm[protein_key]``.

The multiomics family trains on such a file and translates cells of such files, and both
need the same guarantees before any model sees a value: the protein matrix exists, has one
row per cell and named columns, and both matrices hold finite, non-negative, integer counts
(the NB likelihoods and the log1p normalization assume counts). Every failure is one
``DataValidationError`` naming the file, the field and the fix. No torch here.

Protein names: a DataFrame in ``obsm`` (anndata's usual form, e.g. from muon or CiteFuse)
names its columns; a plain array's columns are named by ``uns[protein_key + "_names"]`` when
the file has that list, else ``protein_0``, ``protein_1``, ...
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .errors import DataValidationError

__all__ = ["check_count_values", "protein_counts", "rna_counts"]

_COUNT_FIX = "store raw integer counts (not normalized or scaled values)"


def check_count_values(values: np.ndarray, source, field: str) -> None:
    """Refuse NaN/inf, negative and non-integer entries of ``values`` (a dense array or the
    stored entries of a sparse matrix), naming the first offending entry's position."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        bad, problem = (values < 0, "negative count") if values.dtype.kind == "i" else (None, "")
    else:
        bad, problem = ~np.isfinite(values), "NaN or infinite value"
        if not bad.any():
            bad, problem = values < 0, "negative count"
        if not bad.any():
            bad, problem = values != np.floor(values), "non-integer value where counts are expected"
    if bad is not None and bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), values.shape)
        where = f"entry {tuple(int(i) for i in first)}" if values.ndim > 1 else "a stored entry"
        raise DataValidationError(source, field, f"{problem} {values[first].item()!r} at {where}",
                                  _COUNT_FIX)  # fmt: skip


def rna_counts(adata, source) -> sp.csr_matrix:
    """``X`` as float32 CSR counts, checked (stored entries only: zeros are valid counts)."""
    x = adata.X
    if x is None:
        raise DataValidationError(source, "X", "the file has no RNA matrix", "put RNA counts in X")
    x = sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else x.tocsr()
    check_count_values(x.data, source, "X")
    return x.astype(np.float32)


def protein_counts(adata, key: str, source) -> tuple[np.ndarray, list[str]]:
    """(the protein counts as float32 (n_cells, n_proteins), the protein names)."""
    field = f"obsm['{key}']"
    if key not in adata.obsm:
        present = sorted(adata.obsm.keys())
        raise DataValidationError(
            source, field, f"missing (obsm holds {present or 'nothing'})",
            f"put the protein counts in obsm['{key}'], or name their key with "
            "data.protein_key (training) / --protein-key (predict)",
        )  # fmt: skip
    table = adata.obsm[key]
    if hasattr(table, "columns"):  # a DataFrame: its columns name the proteins
        names = [str(c) for c in table.columns]
        values = table.to_numpy()
    else:
        values = table.toarray() if sp.issparse(table) else np.asarray(table)
        given = adata.uns.get(f"{key}_names")
        n = values.shape[1] if values.ndim == 2 else 0
        names = [str(g) for g in given] if given is not None and len(given) == n else [
            f"protein_{i}" for i in range(n)
        ]  # fmt: skip
    if values.ndim != 2 or values.shape[0] != adata.n_obs or values.shape[1] < 1:
        raise DataValidationError(
            source, field, f"shape {tuple(values.shape)} is not (cells={adata.n_obs}, proteins "
            ">= 1)", "store one row of protein counts per cell",
        )  # fmt: skip
    if len(set(names)) != len(names):
        raise DataValidationError(source, field, "protein names are not unique",
                                  "give every protein column its own name")  # fmt: skip
    if values.dtype.kind not in "iuf":
        raise DataValidationError(source, field, f"values of dtype {values.dtype} are not "
                                  "numbers", _COUNT_FIX)  # fmt: skip
    check_count_values(values, source, field)
    return values.astype(np.float32), names
