"""Reference read paths the benchmark compares our stores against.

Each function reads random batches of ``batch_size`` cells as CSR for about ``seconds`` and
returns cells/s. They mirror how other tools read h5ad: anndata's backed mode, and direct
h5py CSR row reads as Arc's cell-load does; ``numpy_in_memory_random`` is the upper bound
(everything already decoded in RAM).
"""

from __future__ import annotations

import time

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp


def _timed(read_batch, n_cells: int, batch_size: int, seconds: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows = np.sort(rng.choice(n_cells, size=batch_size, replace=False))
        batch = read_batch(rows)
        done += batch.shape[0]
    return done / (time.perf_counter() - start)


def anndata_backed_random(path: str, batch_size: int = 256, seconds: float = 10.0, seed: int = 0):
    adata = ad.read_h5ad(path, backed="r")
    try:
        return _timed(lambda r: adata.X[r], adata.n_obs, batch_size, seconds, seed)
    finally:
        adata.file.close()


def h5py_csr_random(path: str, batch_size: int = 256, seconds: float = 10.0, seed: int = 0):
    """One slice of data/indices per cell through the row pointers, as cell-load does."""
    with h5py.File(path, "r") as f:
        group = f["X"]
        indptr = group["indptr"][:]
        data, indices = group["data"], group["indices"]
        n_cells, n_genes = (int(v) for v in group.attrs["shape"])

        def read(rows: np.ndarray) -> sp.csr_matrix:
            parts_d, parts_i, lengths = [], [], []
            for r in rows:
                a, b = indptr[r], indptr[r + 1]
                parts_d.append(data[a:b])
                parts_i.append(indices[a:b])
                lengths.append(b - a)
            ptr = np.concatenate([[0], np.cumsum(lengths)])
            return sp.csr_matrix(
                (np.concatenate(parts_d), np.concatenate(parts_i), ptr),
                shape=(len(rows), n_genes),
            )

        return _timed(read, n_cells, batch_size, seconds, seed)


def numpy_in_memory_random(
    matrix: sp.csr_matrix, batch_size: int = 256, seconds: float = 10.0, seed: int = 0
) -> float:
    # anndata reads int32 indices with int64 indptr; scipy then upcasts the whole matrix on
    # every row gather, so give both one dtype first (an upper bound should not pay that).
    index_dtype = np.int32 if matrix.nnz < 2**31 else np.int64
    matrix = sp.csr_matrix(
        (matrix.data, matrix.indices.astype(index_dtype), matrix.indptr.astype(index_dtype)),
        shape=matrix.shape,
    )
    return _timed(lambda r: matrix[r], matrix.shape[0], batch_size, seconds, seed)
