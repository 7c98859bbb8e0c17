"""Read a whole ``.h5ad`` that a command was given, with one clear error for a bad file.

``anndata.read_h5ad`` fails on a missing file, a directory, a CSV renamed ``.h5ad`` or a
truncated file with errors from h5py or anndata internals; every command that loads a whole
file (controls, training cells, predictions, real cells) goes through here instead, so the
user gets one line naming the file, the flag and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataValidationError

__all__ = ["read_h5ad"]


def read_h5ad(path: str | os.PathLike, flag: str = "file"):
    """``anndata.read_h5ad(path)``; any failure is a DataValidationError on ``path``."""
    import anndata as ad
    import h5py

    path = Path(path)
    fix = "pass an .h5ad written by anndata (adata.write_h5ad)"
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "file not found"
        raise DataValidationError(path, flag, problem, "check the path")
    if not h5py.is_hdf5(path):
        raise DataValidationError(path, flag, "not an h5ad file (not HDF5)", fix)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise DataValidationError(path, flag, f"not a readable h5ad ({detail})", fix) from exc
