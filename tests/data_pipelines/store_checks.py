"""Helpers shared by the store tests: write blocks through a real writer, compare blocks,
the group index a store must report."""

from __future__ import annotations

import numpy as np
import pandas as pd

from latentcell.data_pipelines.blocks import CellBlock, StoreSpec
from latentcell.data_pipelines.stores import make_writer


def write(fmt: str, path, spec: StoreSpec, blocks: list[CellBlock], **opts) -> str:
    with make_writer(fmt, path, spec, **opts) as w:
        for b in blocks:
            w.append(b)
        return w.finish()


def assert_blocks_equal(got: CellBlock, want: CellBlock, rows: np.ndarray, names=True) -> None:
    """Exact equality of everything a reader returns, dtypes included."""
    assert got.X.shape == want.X.shape
    assert got.X.dtype == np.float32 and got.X.indices.dtype == np.int32
    assert (got.X != want.X).nnz == 0
    np.testing.assert_array_equal(got.X.indptr, want.X.indptr)
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_array_equal(got.library_size, want.library_size)
    assert got.codes.keys() == want.codes.keys() and got.numeric.keys() == want.numeric.keys()
    for k in want.codes:
        np.testing.assert_array_equal(got.codes[k], want.codes[k])
        assert got.codes[k].dtype == np.int32
    for k in want.numeric:
        np.testing.assert_array_equal(got.numeric[k], want.numeric[k])
        assert got.numeric[k].dtype == want.numeric[k].dtype
    if names:
        assert list(got.names) == list(want.names)
    else:
        assert got.names is None


def expected_groups(full: CellBlock, spec: StoreSpec) -> pd.DataFrame:
    """One row per run of equal (cell type, perturbation, batch) codes, with its row range."""
    roles = ["cell_type", "perturbation", "batch"]
    key = pd.DataFrame(
        {
            r: full.codes[spec.roles[r]] if spec.roles[r] else np.full(full.n_cells, -1)
            for r in roles
        }
    )
    starts = np.flatnonzero((key != key.shift()).any(axis=1).to_numpy())
    out = key.iloc[starts].reset_index(drop=True).astype(np.int32)
    out["start"] = starts.astype(np.int64)
    out["stop"] = np.append(starts[1:], full.n_cells).astype(np.int64)
    return out
