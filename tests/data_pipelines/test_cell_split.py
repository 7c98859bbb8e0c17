"""Validation splits by cells, stratified, and the choice between cells and read units:
exact shares per stratum, a training cell kept in every stratum, the same rows from a count
store and its latent store, and ``split_by=auto`` on a small chunky store and on a store of
many units."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.cell_split import resolve_columns, stratified_cell_split
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.latent_store import LatentStoreReader, write_latent_store
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.data_pipelines.split_choice import choose_split, label_shares
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.unit_split import split_units
from tests.synthetic_stores import chunky_sorted_store


def _memory_store(types: np.ndarray, unit_cells: int = 100, seed: int = 0) -> InMemoryStore:
    rng = np.random.default_rng(seed)
    n = len(types)
    X = sp.random(n, 6, density=0.3, format="csr", random_state=1, dtype=np.float32)
    obs = pd.DataFrame(
        {"ct": types, "batch": rng.choice(["b0", "b1"], n), "donor": rng.choice(["x", "y"], n)},
        index=[f"c{i}" for i in range(n)],
    )
    roles = {"cell_type": "ct", "batch": "batch"}
    return InMemoryStore.from_obs(X, obs, roles=roles, unit_cells=unit_cells)


@pytest.fixture(scope="module")
def chunky(tmp_path_factory):
    return chunky_sorted_store(tmp_path_factory.mktemp("chunky"))


def test_every_stratum_holds_out_its_share_and_keeps_a_training_cell():
    types = np.repeat(["a", "b", "c", "d"], [700, 150, 200, 1])
    store = _memory_store(types)
    train, val = stratified_cell_split(store, ("cell_type", "batch"), 0.1, seed=3)
    assert train.dtype == val.dtype == np.int64
    assert np.array_equal(np.union1d(train, val), np.arange(len(types)))
    assert len(np.intersect1d(train, val)) == 0 and np.all(np.diff(val) > 0)
    batch = store.read_rows(0, len(types)).codes["batch"]
    for t in ("a", "b", "c", "d"):
        for b in (0, 1):
            rows = np.flatnonzero((types == t) & (batch == b))
            if len(rows) == 0:
                continue
            want = min(len(rows) - 1, math.floor(0.1 * len(rows) + 0.5))
            assert np.isin(rows, val).sum() == want, (t, b)
            assert np.isin(rows, train).sum() >= 1  # the 1-cell stratum of "d" trains
    again = stratified_cell_split(store, ("batch", "ct"), 0.1, seed=3)  # order, names: same
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_cell_split(store, ("ct", "batch"), 0.1, 4)[1], val)
    assert not np.array_equal(stratified_cell_split(store, ("ct",), 0.1, 3)[1], val)
    # at a large fraction too, a 1-cell stratum trains and the others keep one cell
    train, val = stratified_cell_split(store, ("ct",), 0.9995, seed=0)
    assert np.isin(np.flatnonzero(types == "d"), train).all()
    assert len(train) == 4 and len(val) == len(types) - 4


def test_strata_of_equal_size_draw_their_own_cells():
    """Each stratum's generator is seeded by its codes, not shared with strata of its size."""
    store = _memory_store(np.repeat(["a", "b"], [100, 100]))
    _, val = stratified_cell_split(store, ("ct",), 0.2, seed=0)
    first, second = val[val < 100], val[val >= 100] - 100
    assert len(first) == len(second) == 20 and not np.array_equal(first, second)


def test_default_columns_are_the_roles_and_a_typo_names_the_columns():
    store = _memory_store(np.repeat(["a", "b"], [60, 40]))
    assert resolve_columns(store.meta, ()) == ("batch", "ct")
    assert resolve_columns(store.meta, ("cell_type", "donor")) == ("ct", "donor")
    with pytest.raises(DataValidationError, match=r"data\.stratify.*'tissue'.*'donor'"):
        resolve_columns(store.meta, ("tissue",))


def test_count_store_and_its_latent_store_give_the_same_rows(small_store, tmp_path):
    """Role columns come from the group index (no unit is read); the latent store has no
    index and is read unit by unit: the same codes, the same rows."""
    reader = open_store(small_store)
    latents = tmp_path / "latents"
    write_latent_store(reader, lambda b: np.zeros((b.n_cells, 2), np.float32), latents, 2)

    def no_reads(unit):
        raise AssertionError("the role path read a unit")

    reader.read_unit = no_reads
    by_roles = stratified_cell_split(reader, (), 0.2, seed=5)
    assert len(by_roles[1]) > 0
    latent = LatentStoreReader(latents)
    assert np.array_equal(stratified_cell_split(latent, (), 0.2, seed=5)[1], by_roles[1])
    # a column that is no role is read from either store, with the same result
    with_guides = stratified_cell_split(open_store(small_store), ("guide_id",), 0.2, 5)
    assert np.array_equal(stratified_cell_split(latent, ("guide_id",), 0.2, 5)[1], with_guides[1])


def test_auto_splits_a_small_chunky_store_by_cells(chunky):
    reader = open_store(chunky)
    meta = reader.meta
    assert len(meta.unit_sizes) == 2 and meta.n_cells == 1090
    # what the split by read units did: whole cell types held out
    shares = label_shares(reader, "cell_type", split_units(2, 0.05, 0)[1])
    assert (shares["held"] == shares["cells"]).sum() >= 1

    chosen = choose_split(reader, "auto", (), 0.05, seed=0)
    assert chosen.by == "cells" and "2 read units, fewer than 100" in chosen.reason
    assert chosen.columns == ("batch", "cell_type", "target_gene")
    assert chosen.line().startswith("validation split: by cells, stratified by batch, cell_type")
    types = reader.read_rows(0, meta.n_cells).codes["cell_type"]
    for code in range(len(meta.categories["cell_type"])):
        cells = np.flatnonzero(types == code)
        kept = np.isin(cells, chosen.train).mean()
        assert 0.92 <= kept < 1.0, (code, kept)  # ~95% of every cell type trains
    assert 0.04 <= len(chosen.val) / meta.n_cells <= 0.06


def test_explicit_units_refuse_a_split_that_loses_a_label(chunky):
    with pytest.raises(DataValidationError) as err:
        choose_split(open_store(chunky), "units", (), 0.05, seed=0)
    message = str(err.value)
    assert "\n" not in message and str(chunky) in message
    assert "data.split_by" in message and "no training cell of" in message
    assert "Fix: set data.split_by=cells" in message


def test_auto_keeps_units_on_a_store_of_many_units(tmp_path):
    store = chunky_sorted_store(tmp_path, chunk_cells=10)
    reader = open_store(store)
    chosen = choose_split(reader, "auto", (), 0.05, seed=0)
    assert chosen.by == "units" and "109 read units" in chosen.reason
    assert np.array_equal(chosen.val, split_units(109, 0.05, 0)[1])
    assert chosen.n_val_cells == 10 * len(chosen.val)


def test_auto_splits_by_cells_when_a_unit_split_holds_out_a_small_label():
    """200 units of 10 cells: enough units, but a 10-cell cell type lying in one held-out unit
    would never train; in a training unit, the unit split stays."""
    train, held = split_units(200, 0.05, 0)
    for unit, expected in ((held[0], "cells"), (train[0], "units")):
        types = np.full(2000, "common", dtype=object)
        types[10 * unit : 10 * unit + 10] = "rare"
        chosen = choose_split(_memory_store(types, unit_cells=10), "auto", ("ct",), 0.05, 0)
        assert chosen.by == expected
        if expected == "cells":
            assert "100% of ct 'rare' (10 cells)" in chosen.reason


def test_no_stratum_large_enough_is_one_line():
    store = _memory_store(np.repeat(["a", "b", "c"], [3, 4, 3]), unit_cells=5)
    with pytest.raises(
        DataValidationError, match=r"data\.val_fraction: at val_fraction=0.05, no stratum.*Fix:"
    ):
        choose_split(store, "cells", ("ct", "batch"), 0.05, seed=0)
