"""Helpers shared by the store tests: write blocks through a real writer, compare blocks."""

from __future__ import annotations

import numpy as np

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
