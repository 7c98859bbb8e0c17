"""Value checks on streamed count blocks: each error names file, X, row, obs name, gene, fix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.validate import BlockContext, check_counts

NAMES = np.array([f"cell{i}" for i in range(10)])
GENES = np.array(["A", "B", "C", "D"])


def _block(values: dict, dtype=np.float32) -> sp.csr_matrix:
    dense = np.zeros((3, 4), dtype=dtype)
    dense[0, 0] = 2
    for (r, c), v in values.items():
        dense[r, c] = v
    return sp.csr_matrix(dense)


def _ctx(rows=(7, 2, 5)) -> BlockContext:
    return BlockContext("in.h5ad", np.array(rows), NAMES, GENES)


def test_integer_valued_floats_and_ints_pass():
    check_counts(_block({(1, 2): 3.0, (2, 3): 1e6}), _ctx())
    check_counts(_block({(1, 2): 3}, dtype=np.int32), _ctx())
    check_counts(_block({(1, 2): 3}, dtype=np.uint16), _ctx())


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-1.0, "negative"),
        (0.5, "non-integer"),
    ],
)
def test_bad_values_point_at_cell_and_gene(value, problem):
    with pytest.raises(DataValidationError) as err:
        check_counts(_block({(1, 2): value}), _ctx())
    e = err.value
    assert e.path == "in.h5ad" and e.field == "X" and problem in e.problem
    assert "row 2 (obs 'cell2')" in e.problem and "gene 'C'" in e.problem
    assert e.fix and "\n" not in str(e)


def test_non_integer_allowed_when_not_counts():
    check_counts(_block({(1, 2): 0.5}), _ctx(), integer=False)
    with pytest.raises(DataValidationError, match="negative"):
        check_counts(_block({(1, 2): -0.5}), _ctx(), integer=False)


def test_negative_integers():
    with pytest.raises(DataValidationError, match="negative count"):
        check_counts(_block({(2, 1): -3}, dtype=np.int64), _ctx())


def test_reports_the_lowest_input_row():
    X = _block({(0, 1): 0.5, (2, 3): 0.5})  # block rows 0 and 2 are input rows 7 and 5
    with pytest.raises(DataValidationError, match=r"row 5 \(obs 'cell5'\), column 3"):
        check_counts(X, _ctx())
