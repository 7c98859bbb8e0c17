"""Write an AnnData ``.h5ad`` whose CSR ``X`` arrives chunk by chunk.

anndata can only write a matrix it holds in memory; a 1M-cell synthetic data set or a
re-exported store does not fit. This writer appends CSR rows to resizable h5py datasets laid out
exactly as anndata lays out a ``csr_matrix`` element (``X/data`` float32, ``X/indices`` int32,
``X/indptr`` int64, group attrs ``encoding-type``, ``encoding-version``, ``shape``). ``obs``,
``var`` and ``uns`` are small and are written at ``close`` with ``anndata.io.write_elem``, so their
encoding is anndata's own.

The file is built at a temporary sibling path and renamed into place on ``close``; any exception
inside the ``with`` block removes it, so a half-written file never sits at the destination.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

ANNDATA_ENCODING = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
CSR_ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
# Empty elements anndata writes for every file; readers of other tools expect them.
EMPTY_ELEMENTS = ("layers", "obsm", "obsp", "varm", "varp")
DEFAULT_NNZ_CHUNK = 1 << 18  # 1 MiB of float32 per HDF5 chunk
COMPRESSIONS = ("none", "gzip", "lzf")


def temporary_sibling(path: Path) -> Path:
    """A unique name beside ``path`` so the final rename stays on one file system."""
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")


class H5adStreamWriter:
    """Append CSR row chunks to an ``.h5ad``; write obs/var/uns and publish at ``close``.

    Use as a context manager: leaving the block by an exception (or without ``close``)
    removes the temporary file and leaves the destination untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_vars: int,
        *,
        compression: str = "none",
        compression_level: int | None = None,
        nnz_chunk: int = DEFAULT_NNZ_CHUNK,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.path = Path(path)
        self.n_vars = int(n_vars)
        self.n_obs = 0
        self.nnz = 0
        self.tmp_path = temporary_sibling(self.path)
        self._file: h5py.File | None = h5py.File(self.tmp_path, "w")
        self._x = self._create_x(compression, compression_level, nnz_chunk)

    def _create_x(self, compression: str, level: int | None, nnz_chunk: int) -> h5py.Group:
        """Empty, resizable CSR datasets with anndata's encoding attributes."""
        opts = {} if compression == "none" else {"compression": compression}
        if compression == "gzip" and level is not None:
            opts["compression_opts"] = level
        x = self._file.create_group("X")
        x.attrs.update(CSR_ENCODING)
        x.attrs["shape"] = np.array([0, self.n_vars], dtype=np.int64)
        for name, dtype in (("data", np.float32), ("indices", np.int32)):
            x.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(nnz_chunk,), **opts
            )
        indptr_chunk = max(1, min(nnz_chunk, 1 << 16))
        x.create_dataset(
            "indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(indptr_chunk,), **opts
        )
        return x

    def append(self, X: sp.spmatrix | sp.sparray | np.ndarray) -> None:
        """Append rows (any sparse format or a dense array) below the rows written so far."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        csr = _as_csr(X, self.n_vars)
        n, nnz = csr.shape[0], csr.nnz
        _extend(self._x["data"], csr.data.astype(np.float32, copy=False))
        _extend(self._x["indices"], csr.indices.astype(np.int32, copy=False))
        _extend(self._x["indptr"], csr.indptr[1:].astype(np.int64) + self.nnz)
        self.n_obs += n
        self.nnz += nnz

    def close(self, obs: pd.DataFrame, var: pd.DataFrame, uns: dict | None = None) -> Path:
        """Write obs, var and uns, then rename the finished file into place."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        _check_frame("obs", obs, self.n_obs)
        _check_frame("var", var, self.n_vars)
        f = self._file
        self._x.attrs["shape"] = np.array([self.n_obs, self.n_vars], dtype=np.int64)
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", var)
        anndata.io.write_elem(f, "uns", dict(uns or {}))
        for name in EMPTY_ELEMENTS:
            anndata.io.write_elem(f, name, {})
        f.attrs.update(ANNDATA_ENCODING)
        f.close()
        self._file = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; safe to call more than once."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> H5adStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(f"{self.path}: left the with block without close(); file removed")


def _as_csr(X, n_vars: int) -> sp.csr_matrix:
    """Canonical CSR (sorted indices) with the writer's number of columns."""
    csr = sp.csr_matrix(X)
    if csr.shape[1] != n_vars:
        raise ValueError(f"chunk has {csr.shape[1]} columns, the file has {n_vars}")
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    return csr


def _extend(dataset: h5py.Dataset, values: np.ndarray) -> None:
    """Resize a 1-d dataset and write ``values`` at its end."""
    if values.size == 0:
        return
    start = dataset.shape[0]
    dataset.resize((start + values.size,))
    dataset[start:] = values


def _check_frame(name: str, frame: pd.DataFrame, n_rows: int) -> None:
    """anndata needs one row per cell (gene) and a string index."""
    if len(frame) != n_rows:
        raise ValueError(f"{name} has {len(frame)} rows, the matrix has {n_rows}")
    if len(frame) and not all(isinstance(v, str) for v in frame.index[:10]):
        raise ValueError(f"{name} index must hold strings (anndata requires it)")
