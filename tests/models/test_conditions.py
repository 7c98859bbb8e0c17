"""``ConditionSpace.rows``: a continuous condition's value must be a finite number, since NaN
is the null ("not conditioned on") and inf is no value a model was trained on."""

from __future__ import annotations

import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.conditions import ConditionSpace

SPACE = ConditionSpace(
    source="run", categories={"cell_type": ["A", "B"]}, continuous=("time",),
    continuous_mean=(1.0,), continuous_std=(2.0,), roles={"ct": "cell_type"},
)  # fmt: skip


def test_a_continuous_value_is_standardized():
    rows = SPACE.rows(3, {"time": "5", "ct": "B"})
    assert np.array_equal(rows.values, np.full((3, 1), 2.0, np.float32))
    assert rows.obs["time"].tolist() == [5.0] * 3 and rows.codes[:, 0].tolist() == [1] * 3


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1e39"])
def test_a_non_finite_continuous_value_is_refused(value):
    with pytest.raises(DataValidationError, match="finite number") as err:
        SPACE.rows(1, {"time": value})
    assert err.value.path == "run" and err.value.field == "--condition time"
    assert value in err.value.problem and err.value.fix


def test_a_continuous_value_that_is_not_a_number_is_refused():
    with pytest.raises(DataValidationError, match="needs a number"):
        SPACE.rows(1, {"time": "late"})
