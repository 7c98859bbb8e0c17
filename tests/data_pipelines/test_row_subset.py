"""A store restricted to a split's rows streams exactly those rows, resumes exactly, and a
checkpoint of one subset never resumes on another of the same size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.data_pipelines.row_subset import RowSubset, open_row_subset, rows_digest


def _store(n: int = 1050, unit_cells: int = 100) -> InMemoryStore:
    rng = np.random.default_rng(0)
    X = sp.random(n, 12, density=0.3, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n)}, index=[f"c{i}" for i in range(n)])
    return InMemoryStore.from_obs(X, obs, roles={"batch": "batch"}, unit_cells=unit_cells)


def _rows(n: int, seed: int, share: float = 0.7) -> np.ndarray:
    """A scattered subset, like an iid split's train rows, with a whole unit left out."""
    keep = np.random.default_rng(seed).random(n) < share
    keep[300:400] = False  # unit 3 holds no selected row: dropped from the view
    return np.flatnonzero(keep)


def test_subset_yields_its_rows_once_and_their_cells():
    base = _store()
    rows = _rows(base.meta.n_cells, seed=0)
    view = RowSubset(base, rows)
    assert view.meta.n_cells == len(rows) and 3 not in view.units
    stream = CellStream(view, CellStreamConfig(batch_size=64, tail="partial", output="dense"))
    batches = list(stream.loader())
    seen = np.concatenate([b["row"].numpy() for b in batches])
    assert np.array_equal(np.sort(seen), rows)  # every selected row once, nothing else
    X = np.concatenate([b["X"].numpy() for b in batches])
    assert np.array_equal(X, base.read_rows(0, base.meta.n_cells).X.toarray()[seen])
    # read_rows numbers the view's rows consecutively, keeping the store's row ids
    assert np.array_equal(view.read_rows(40, 260).rows, rows[40:260])


def test_pad_tail_repeats_selected_rows_only():
    base = _store()
    rows = _rows(base.meta.n_cells, seed=1)
    config = CellStreamConfig(batch_size=100, tail="pad")
    for rank in range(3):
        stream = CellStream(RowSubset(base, rows), config, rank=rank, world_size=3)
        seen = np.concatenate([b["row"].numpy() for b in stream.loader()])
        assert set(seen.tolist()) <= set(rows.tolist())


def test_resume_is_exact_and_refuses_another_subset():
    base = _store()
    rows = _rows(base.meta.n_cells, seed=2)
    config = CellStreamConfig(batch_size=32, seed=5)
    whole = CellStream(RowSubset(base, rows), config)
    whole.set_epoch(1)
    expected = [b["row"].numpy() for b in whole.loader()]

    loader = CellStream(RowSubset(base, rows), config).loader()
    loader.set_epoch(1)
    first = []
    for batch in loader:
        first.append(batch["row"].numpy())
        if len(first) == 7:
            break
    state = loader.state_dict()
    assert state["layout"]["rows_digest"] == rows_digest(rows)

    resumed = CellStream(RowSubset(base, rows), config).loader()
    resumed.load_state_dict(state)
    rest = [b["row"].numpy() for b in resumed]
    assert all(np.array_equal(a, b) for a, b in zip(first + rest, expected, strict=True))

    # another split of exactly the same size and units: same counts, other cells
    other = rows.copy()
    free = np.setdiff1d(np.arange(400, 500), rows)
    other[np.searchsorted(rows, 400)] = free[0]
    other = np.sort(other)
    assert len(other) == len(rows) and not np.array_equal(other, rows)
    stranger = CellStream(RowSubset(base, other), config).loader()
    with pytest.raises(ValueError, match="rows_digest"):
        stranger.load_state_dict(state)


def test_plain_streams_keep_their_layout():
    """Checkpoints written before row subsets existed still resume: no new layout key."""
    stream = CellStream(_store(), CellStreamConfig(batch_size=32))
    assert "rows_digest" not in stream.state_dict()["layout"]


def test_bad_rows_are_refused(tmp_path):
    base = _store()
    with pytest.raises(ValueError, match="at least one row"):
        RowSubset(base, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="must lie in"):
        RowSubset(base, np.array([5, base.meta.n_cells]))
    bad = tmp_path / "split.npz"
    bad.write_bytes(b"not an npz")
    from latentcell.data_pipelines.errors import DataValidationError

    with pytest.raises(DataValidationError, match="split.npz: train"):
        open_row_subset(tmp_path / "store", bad, "train")
