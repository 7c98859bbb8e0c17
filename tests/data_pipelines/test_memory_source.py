"""InMemoryStore is a real StoreReader: units, row reads, group index, constructors."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.blocks import ROLES
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.memory_source import InMemoryStore, compute_group_index

N_CELLS, N_GENES = 233, 17


def _store(unit_cells: int = 40, sort: bool = False) -> InMemoryStore:
    rng = np.random.default_rng(0)
    X = sp.random(N_CELLS, N_GENES, density=0.3, format="csr", random_state=1, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    obs = pd.DataFrame(
        {
            "ct": rng.choice(["a", "b"], N_CELLS),
            "pert": rng.choice(["ctrl", "g1", "g2"], N_CELLS),
            "bt": rng.choice(["x", "y"], N_CELLS),
            "depth": rng.random(N_CELLS),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    store = InMemoryStore.from_obs(
        X,
        obs,
        roles={"cell_type": "ct", "perturbation": "pert", "batch": "bt"},
        control_label="ctrl",
        unit_cells=unit_cells,
    )
    return store.sorted_by_group() if sort else store


def test_units_cover_rows_in_order():
    store = _store(unit_cells=40)
    sizes = store.meta.unit_sizes
    assert list(sizes) == [40] * 5 + [33]
    blocks = [store.read_unit(k) for k in range(len(sizes))]
    rows = np.concatenate([b.rows for b in blocks])
    np.testing.assert_array_equal(rows, np.arange(N_CELLS))
    X = sp.vstack([b.X for b in blocks]).toarray()
    np.testing.assert_array_equal(X, store.X.toarray())
    with pytest.raises(IndexError):
        store.read_unit(len(sizes))


def test_read_rows_content():
    store = _store()
    block = store.read_rows(17, 101)
    np.testing.assert_array_equal(block.X.toarray(), store.X[17:101].toarray())
    np.testing.assert_allclose(block.library_size, store.X[17:101].sum(axis=1).A1)
    np.testing.assert_array_equal(block.codes["ct"], store.codes["ct"][17:101])
    np.testing.assert_array_equal(block.numeric["depth"], store.numeric["depth"][17:101])
    assert block.names[0] == "cell17"
    assert store.read_rows(5, 5).n_cells == 0


def test_group_index_matches_brute_force():
    store = _store()
    index = store.group_index()
    codes = np.stack([store.codes[c] for c in ("ct", "pert", "bt")], axis=1)
    # every range is homogeneous and maximal, ranges tile the rows
    assert index["start"].iloc[0] == 0 and index["stop"].iloc[-1] == N_CELLS
    np.testing.assert_array_equal(index["start"].to_numpy()[1:], index["stop"].to_numpy()[:-1])
    for row in index.itertuples():
        part = codes[row.start : row.stop]
        assert (part == [row.cell_type, row.perturbation, row.batch]).all()
        if row.stop < N_CELLS:
            assert (codes[row.stop] != part[-1]).any()
    assert list(index.columns) == [*ROLES, "start", "stop"]


def test_group_index_missing_role_is_minus_one():
    index = compute_group_index({"cell_type": np.array([0, 0, 1])}, 3)
    assert index["perturbation"].tolist() == [-1, -1]
    assert index[["start", "stop"]].to_numpy().tolist() == [[0, 2], [2, 3]]


def test_sorted_by_group_makes_groups_contiguous():
    store = _store(sort=True)
    index = store.group_index()
    keys = index[list(ROLES)].apply(tuple, axis=1)
    assert keys.is_unique
    assert index["start"].iloc[0] == 0 and index["stop"].iloc[-1] == N_CELLS


def test_from_reader_round_trip_keeps_layout():
    source = _store(unit_cells=50)
    copy = InMemoryStore.from_reader(source)
    np.testing.assert_array_equal(copy.meta.unit_sizes, source.meta.unit_sizes)
    assert (copy.X != source.X).nnz == 0
    assert copy.meta.roles == source.meta.roles and copy.meta.control_label == "ctrl"
    pd.testing.assert_frame_equal(copy.group_index(), source.group_index())
    rechunked = InMemoryStore.from_reader(source, unit_cells=100)
    assert list(rechunked.meta.unit_sizes) == [100, 100, 33]


def test_from_anndata():
    anndata = pytest.importorskip("anndata")
    store = _store()
    adata = anndata.AnnData(
        X=store.X.copy(),
        obs=pd.DataFrame(
            {"ct": pd.Categorical(np.array(["a", "b"])[store.codes["ct"]]), "n": np.arange(233)},
            index=[f"c{i}" for i in range(N_CELLS)],
        ),
        var=pd.DataFrame(
            {"gene_id": [f"ENSG{i}" for i in range(N_GENES)]}, index=list("abcdefghijklmnopq")
        ),
    )
    mem = InMemoryStore.from_anndata(adata, roles={"cell_type": "ct"}, sort_by_group=True)
    assert mem.meta.var.index.name == "gene_key" and mem.meta.var["gene_id"].iloc[1] == "ENSG1"
    assert mem.meta.categories["ct"] == ["a", "b"] and mem.meta.numeric_columns == ["n"]
    assert np.all(np.diff(mem.codes["ct"]) >= 0)
    assert len(mem.group_index()) == 2


def test_validation_errors():
    X = sp.csr_matrix(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(DataValidationError, match="control_label"):
        InMemoryStore(
            X,
            codes={"p": [0, 1, 0]},
            categories={"p": ["ctrl", "g"]},
            roles={"perturbation": "p"},
            control_label="non-targeting",
        )
    with pytest.raises(DataValidationError, match="codes outside"):
        InMemoryStore(X, codes={"p": [0, 5, 0]}, categories={"p": ["ctrl", "g"]})
    with pytest.raises(DataValidationError, match="roles/cell_type"):
        InMemoryStore(X, roles={"cell_type": "nope"})


def test_pickle_round_trip():
    store = _store()
    again = pickle.loads(pickle.dumps(store))
    assert (again.read_unit(2).X != store.read_unit(2).X).nnz == 0
