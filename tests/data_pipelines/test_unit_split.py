"""Held-out splits by whole read units: disjoint, complete, deterministic, streamable."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.data_pipelines.unit_split import (
    UnitSubset,
    held_out_share,
    split_units,
    warn_lopsided_split,
)


def _store(n: int = 1050, unit_cells: int = 100) -> InMemoryStore:
    rng = np.random.default_rng(0)
    X = sp.random(n, 12, density=0.3, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n)}, index=[f"c{i}" for i in range(n)])
    return InMemoryStore.from_obs(X, obs, roles={"batch": "batch"}, unit_cells=unit_cells)


def test_split_is_a_deterministic_partition():
    train, val = split_units(40, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(40))
    again = split_units(40, 0.1, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(split_units(40, 0.1, seed=4)[1], val)
    assert len(split_units(40, 0.0, seed=0)[1]) == 0
    assert len(split_units(3, 0.01, seed=0)[1]) == 1  # at least one unit held out
    with pytest.raises(ValueError, match="val_path"):
        split_units(1, 0.1, seed=0)


def test_subset_streams_exactly_its_units():
    base = _store()
    train_units, val_units = split_units(len(base.meta.unit_sizes), 0.2, seed=0)
    rows = {}
    for name, units in (("train", train_units), ("val", val_units)):
        subset = UnitSubset(base, units)
        assert subset.meta.n_cells == int(base.meta.unit_sizes[units].sum())
        stream = CellStream(subset, CellStreamConfig(batch_size=64, tail="partial"))
        seen = np.concatenate([b["row"].numpy() for b in stream.loader()])
        assert len(seen) == len(np.unique(seen)) == subset.meta.n_cells
        rows[name] = set(seen.tolist())
    assert not rows["train"] & rows["val"]
    assert len(rows["train"] | rows["val"]) == base.meta.n_cells


def test_subset_read_rows_spans_units():
    base = _store()
    subset = UnitSubset(base, np.array([7, 2, 10]))  # unit 10 is the short last one
    block = subset.read_rows(50, 180)
    expected = np.concatenate([np.arange(750, 800), np.arange(200, 280)])
    assert np.array_equal(block.rows, expected)
    want = base.read_rows(200, 280).X.toarray()
    assert np.array_equal(block.X.toarray()[50:], want)
    assert np.array_equal(subset.read_rows(200, 250).rows, np.arange(1000, 1050))


def _sorted_store() -> InMemoryStore:
    """Cell types in contiguous runs, as a built store holds them: a 700, b 150, c 200."""
    labels = np.repeat(["a", "b", "c"], [700, 150, 200])
    X = sp.random(len(labels), 5, density=0.3, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame({"ct": labels}, index=[f"c{i}" for i in range(len(labels))])
    return InMemoryStore.from_obs(X, obs, roles={"cell_type": "ct"}, unit_cells=100)


def test_held_out_share_matches_a_cell_by_cell_count():
    store = _sorted_store()
    labels = np.repeat(["a", "b", "c"], [700, 150, 200])
    sizes = store.meta.unit_sizes
    for val_units in (np.array([7, 8]), np.array([0, 6]), np.array([10]), np.arange(11)):
        in_val = np.repeat(np.isin(np.arange(len(sizes)), val_units), sizes)
        share = held_out_share(store.group_index(), sizes, val_units, "cell_type")
        cats = store.meta.categories["ct"]
        for code, row in share.iterrows():
            mine = labels == cats[int(code)]
            assert row["cells"] == mine.sum()
            assert row["held"] == (mine & in_val).sum()


def test_lopsided_split_warns_with_the_fix():
    store = _sorted_store()
    with pytest.warns(UserWarning, match=r"'b' 100% of 150.*data\.val_path"):
        assert warn_lopsided_split(store, np.array([7, 8])) == ["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_lopsided_split(store, np.array([0, 9])) == []  # a 1/7, c 1/2 at most
