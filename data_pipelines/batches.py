"""The batch dict the loaders hand to the trainer, built from a ``CellBlock`` in a few array ops.

A batch is a plain ``dict`` of tensors (and dicts of tensors), so
``accelerate.utils.send_to_device`` moves it without a custom type::

    X             (n, n_genes) float32: torch sparse CSR (output="csr") or dense (output="dense")
    library_size  (n,) float32   sum of the cell's counts over the stored genes
    obs           {column: (n,) int64 codes} for the requested categorical columns, plus each
                  role column again under its role name ("cell_type", "perturbation", "batch")
    numeric       {column: (n,) tensor} only when numeric columns were requested
    row           (n,) int64     global row of each cell in the store
    is_pad        (n,) bool      True for cells repeated only to fill the epoch (drop them from
                                 losses and metrics)

Sparse CSR tensors survive DataLoader worker pickling (torch's multiprocessing reductions
rebuild them in the main process), so no separate indptr/indices/data keys are needed.
``to_dense`` turns either form into a dense tensor on the tensor's own device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .blocks import ROLES, CellBlock, StoreMeta
from .errors import DataValidationError

OUTPUTS = ("csr", "dense")

# Torch warns once per process that sparse CSR is "beta" and that invariant checks are off;
# both fire again in the main process when a worker's batch is unpickled. They carry no
# information for users of this module, so they are silenced by message, nothing else.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


@dataclass(frozen=True)
class BatchSpec:
    """Which fields a batch carries; fixed per loader so every batch has the same keys.

    columns: categorical obs columns delivered under ``obs``.
    roles: (role, column) pairs; each role column is also delivered as ``obs[role]``.
    numeric_columns: numeric obs columns delivered under ``numeric`` (float64 as float32).
    """

    n_genes: int
    output: str = "csr"
    columns: tuple[str, ...] = ()
    roles: tuple[tuple[str, str], ...] = ()
    numeric_columns: tuple[str, ...] = ()

    @classmethod
    def from_meta(
        cls,
        meta: StoreMeta,
        output: str = "csr",
        columns: Sequence[str] | None = None,
        numeric_columns: Sequence[str] = (),
    ) -> BatchSpec:
        """Validate the requested columns against the store.

        ``columns=None`` means every categorical column except internal ones (``_``-prefixed,
        e.g. ``_source_file``). Role aliases must not collide with a different obs column of
        the same name, since ``obs[role]`` would then be ambiguous.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if columns is None:
            columns = [c for c in meta.categories if not c.startswith("_")]
        unknown = [c for c in columns if c not in meta.categories]
        if unknown:
            raise DataValidationError(
                meta.path, "columns", f"{unknown} are not categorical obs columns of the store",
                f"use some of {sorted(meta.categories)}",
            )  # fmt: skip
        unknown = [c for c in numeric_columns if c not in meta.numeric_columns]
        if unknown:
            raise DataValidationError(
                meta.path, "numeric_columns", f"{unknown} are not numeric obs columns",
                f"use some of {sorted(meta.numeric_columns)}",
            )  # fmt: skip
        roles = tuple((r, meta.roles[r]) for r in ROLES if meta.roles.get(r))
        for role, column in roles:
            if role != column and role in meta.categories:
                raise DataValidationError(
                    meta.path, f"obs/{role}", f"the {role} role is column {column!r}, but the "
                    f"store also has an obs column named {role!r}, so obs[{role!r}] would be "
                    "ambiguous (stores built before latentcell refused this at build time)",
                    f"rebuild the store without the column {role!r} or with it as the {role} "
                    "column",
                )  # fmt: skip
        return cls(
            n_genes=meta.n_genes,
            output=output,
            columns=tuple(columns),
            roles=roles,
            numeric_columns=tuple(numeric_columns),
        )


def csr_to_torch(X: sp.csr_matrix) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR float32 tensor, sharing its arrays.

    Indices are sorted first because torch's CSR kernels assume sorted column indices. Row
    pointers and column indices stay int32 when both fit (torch accepts int32 CSR on CPU and
    GPU, and ``to_dense`` is the same): a cast to int64 copied every index of every batch,
    the largest part of the stream's per-batch cost.
    """
    if not X.has_sorted_indices:
        X = X.copy()
        X.sort_indices()
    index = np.int32 if X.nnz < 2**31 and X.shape[1] < 2**31 else np.int64
    return torch.sparse_csr_tensor(
        _tensor(X.indptr, index),
        _tensor(X.indices, index),
        _tensor(X.data, np.float32),
        size=X.shape,
        check_invariants=False,
    )


def _tensor(values: np.ndarray, dtype) -> torch.Tensor:
    """``values`` as a tensor, shared when it can be: copied when a cast is needed or the
    array is read-only (an in-memory source's views; torch tensors must be writable)."""
    out = np.ascontiguousarray(values, dtype=dtype)
    return torch.from_numpy(out if out.flags.writeable else out.copy())


def make_batch(block: CellBlock, spec: BatchSpec, is_pad: np.ndarray | None = None) -> dict:
    """The batch dict for ``block`` (see the module docstring for the keys)."""
    n = block.n_cells
    if isinstance(block.X, np.ndarray):  # derived features (latents) are dense already
        X = torch.from_numpy(np.ascontiguousarray(block.X, dtype=np.float32))
    elif spec.output == "dense":
        X = torch.from_numpy(block.X.toarray().astype(np.float32, copy=False))
    else:
        X = csr_to_torch(block.X)
    obs = {c: torch.from_numpy(block.codes[c].astype(np.int64)) for c in spec.columns}
    for role, column in spec.roles:
        obs[role] = obs[column] if column in obs else _codes(block, column)
    batch = {
        "X": X,
        "library_size": torch.from_numpy(block.library_size.astype(np.float32, copy=False)),
        "obs": obs,
        "row": torch.from_numpy(block.rows.astype(np.int64, copy=False)),
        "is_pad": torch.from_numpy(
            np.zeros(n, dtype=bool) if is_pad is None else np.asarray(is_pad, dtype=bool)
        ),
    }
    if spec.numeric_columns:
        batch["numeric"] = {c: _numeric(block.numeric[c]) for c in spec.numeric_columns}
    return batch


def to_dense(batch_or_X: dict | torch.Tensor) -> torch.Tensor:
    """Dense ``X`` of a batch (or of an ``X`` tensor), on the same device; dense passes through."""
    X = batch_or_X["X"] if isinstance(batch_or_X, dict) else batch_or_X
    return X.to_dense() if X.layout != torch.strided else X


def batch_len(batch: dict) -> int:
    """Number of cells in a batch (padding included)."""
    return int(batch["row"].shape[0])


def _codes(block: CellBlock, column: str) -> torch.Tensor:
    return torch.from_numpy(block.codes[column].astype(np.int64))


def _numeric(values: np.ndarray) -> torch.Tensor:
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))
