"""h5ad reading without loading X: row ranges, permuted row sets, layouts, structural checks."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.h5ad_input import (
    H5adFile,
    OrderedReadPlan,
    coalesce,
    iter_ordered,
    open_input,
    plan_ordered_read,
)
from latentcell.data_pipelines.schemas import get_schema


def counts(n_cells: int, n_genes: int, seed: int = 0, density: float = 0.3) -> sp.csr_matrix:
    """Integer-valued float32 CSR counts (some empty rows, like real data)."""
    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=seed)
    X.data = np.ceil(X.data * 9).astype(np.float32)
    return X.astype(np.float32)


def vcc_obs(n: int, seed: int = 0, targets=("g1", "g2"), batches=("b1", "b2")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.array(["non-targeting", *targets])
    return pd.DataFrame(
        {
            "target_gene": pd.Categorical(rng.choice(labels, n)),
            "batch": pd.Categorical(rng.choice(list(batches), n)),
            "guide_id": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "depth": rng.random(n),
            "n_counts": rng.integers(0, 100, n),
        },
        index=[f"cell{seed}_{i}" for i in range(n)],
    )


def write_h5ad(path, X, obs=None, genes=None, var=None, layout: str = "csr") -> str:
    """Write a small h5ad with X in ``layout`` (csr, csc or dense)."""
    n_cells, n_genes = X.shape
    if var is None:
        var = pd.DataFrame(index=genes if genes is not None else [f"G{j}" for j in range(n_genes)])
    if obs is None:
        obs = vcc_obs(n_cells)
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: m.toarray()}[layout](X)
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return str(path)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_reads_match_the_matrix(tmp_path, layout):
    X = counts(57, 11)
    path = write_h5ad(tmp_path / "a.h5ad", X, layout=layout)
    dense = X.toarray()
    with pytest.warns(UserWarning, match="CSC") if layout == "csc" else _nothing():
        file = H5adFile(path, max_gap=5)
    with file:
        assert file.shape == (57, 11) and file.encoding == layout
        np.testing.assert_array_equal(file.read_range(3, 40).toarray(), dense[3:40])
        rows = np.array([50, 2, 2, 7, 56, 0, 31, 30])  # permuted, repeated
        np.testing.assert_array_equal(file.read_rows(rows).toarray(), dense[rows])
        got = [(r, B.toarray()) for r, B in file.iter_blocks(10, rows=np.arange(57)[::-1])]
        np.testing.assert_array_equal(np.concatenate([b for _, b in got]), dense[::-1])
        whole = sp.vstack([B for _, B in file.iter_blocks(16)])
        np.testing.assert_array_equal(whole.toarray(), dense)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("max_gap", [0, 3, 10**9])
def test_read_rows_is_exact_for_any_gap(tmp_path, max_gap):
    X = counts(200, 30, seed=3)
    path = write_h5ad(tmp_path / "a.h5ad", X)
    rng = np.random.default_rng(0)
    rows = rng.permutation(200)[:120]
    with H5adFile(path, max_gap=max_gap) as file:
        np.testing.assert_array_equal(file.read_rows(rows).toarray(), X.toarray()[rows])
        assert file.read_rows(np.array([], dtype=np.int64)).shape == (0, 30)


def test_release_and_reopen(tmp_path):
    X = counts(20, 5)
    path = write_h5ad(tmp_path / "a.h5ad", X)
    file = H5adFile(path)
    file.release()
    np.testing.assert_array_equal(file.read_range(0, 20).toarray(), X.toarray())
    file.close()


def test_coalesce_merges_small_gaps():
    starts = np.array([0, 10, 12, 40])
    stops = np.array([5, 12, 20, 41])
    assert coalesce(starts, stops, 4) == [(0, 1), (1, 3), (3, 4)]
    assert coalesce(starts, stops, 5) == [(0, 3), (3, 4)]
    assert coalesce(starts, stops, 10**6) == [(0, 4)]
    assert coalesce(np.array([]), np.array([]), 1) == []
    assert coalesce(starts, stops, 10**6, max_span=15) == [(0, 2), (2, 3), (3, 4)]


# ---------------------------------------------------------------- structural errors


def _raises(path, field: str, schema="vcc", **overrides):
    with pytest.raises(DataValidationError) as err:
        open_input(str(path), get_schema(schema, **overrides))
    message = str(err.value)
    assert str(path) in message and field in message and "Fix:" in message
    assert "\n" not in message
    return err.value


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.h5ad", "file")


def test_not_hdf5(tmp_path):
    path = tmp_path / "a.h5ad"
    path.write_text("cell,gene\n")
    assert "not HDF5" in _raises(path, "file").problem


def test_hdf5_without_x(tmp_path):
    path = tmp_path / "a.h5ad"
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=np.zeros(3))
    assert "without X, obs, var" in _raises(path, "X/obs/var").problem


def test_missing_required_obs_column(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", counts(10, 4), obs=vcc_obs(10).drop(columns="batch"))
    err = _raises(path, "obs/batch")
    assert "--batch-col" in err.fix


def test_override_names_the_missing_column(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", counts(10, 4))
    _raises(path, "obs/bio_rep", batch_col="bio_rep")


def test_no_control_cells(tmp_path):
    obs = vcc_obs(10)
    obs["target_gene"] = pd.Categorical(["g1"] * 10)
    path = write_h5ad(tmp_path / "a.h5ad", counts(10, 4), obs=obs)
    assert "no control cells" in _raises(path, "obs/target_gene").problem


def test_duplicate_genes(tmp_path):
    path = tmp_path / "a.h5ad"
    with pytest.warns(UserWarning):  # anndata warns about non-unique var names too
        adata = ad.AnnData(X=counts(6, 3), obs=vcc_obs(6), var=pd.DataFrame(index=list("ABA")))
    adata.write_h5ad(path)
    assert "duplicate gene names ['A']" in _raises(path, "var").problem


@pytest.mark.parametrize("shape", [(0, 4), (5, 0)])
def test_empty_matrix(tmp_path, shape):
    obs = vcc_obs(shape[0])
    path = write_h5ad(tmp_path / "a.h5ad", sp.csr_matrix(shape, dtype=np.float32), obs=obs)
    assert "empty matrix" in _raises(path, "X").problem


def test_open_input_resolves_roles_and_genes(tmp_path):
    var = pd.DataFrame({"gene_id": ["ENSG01000000001", "ENSG01000000002"]}, index=["A", "B"])
    path = write_h5ad(tmp_path / "a.h5ad", counts(8, 2), var=var)
    inp = open_input(path, get_schema("vcc"))
    assert inp.roles.perturbation == "target_gene" and inp.roles.control == "non-targeting"
    assert list(inp.genes.keys) == ["ENSG01000000001", "ENSG01000000002"]
    assert list(inp.genes.symbols) == ["A", "B"]
    inp.close()


@pytest.mark.real_data
def test_papalexi_permuted_reads_match(shared_file):
    path = shared_file("papalexi2021_thp1_sceptre_lowmoi.h5ad")
    inp = open_input(str(path), get_schema("vcc", batch_col="bio_rep"))
    file = inp.file
    assert file.shape == (20729, 299) and inp.roles.cell_type is None
    rows = np.random.default_rng(0).permutation(file.n_cells)[:3000]
    expected = file.read_range(0, file.n_cells)[rows]
    assert (file.read_rows(rows) != expected).nnz == 0
    inp.close()


# ---------------------------------------------------------------- reading in a given order


def _rechunk(path: str, chunk: int) -> None:
    """Store X/data and X/indices gzip-compressed in ``chunk``-entry chunks (many chunks)."""
    with h5py.File(path, "a") as f:
        for name in ("data", "indices"):
            values = f["X"][name][:]
            del f["X"][name]
            f["X"].create_dataset(name, data=values, chunks=(chunk,), compression="gzip")


def test_plan_picks_spill_only_for_scattered_reads_of_uncached_files(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", counts(300, 40, seed=5))
    _rechunk(path, 32)
    scattered = np.random.default_rng(0).permutation(300)
    with H5adFile(path, cache_bytes=64) as file:
        assert plan_ordered_read(file, np.arange(300), 50).mode == "direct"
        plan = plan_ordered_read(file, scattered, 50)
        assert plan.mode == "spill" and plan.chunk_reads > 2 * plan.n_chunks
    with H5adFile(path) as file:  # the default cache holds the whole file
        assert plan_ordered_read(file, scattered, 50).mode == "direct"


@pytest.mark.parametrize("mode", ["direct", "spill"])
def test_iter_ordered_yields_the_order(tmp_path, mode):
    X = counts(300, 40, seed=6)
    path = write_h5ad(tmp_path / "a.h5ad", X)
    _rechunk(path, 32)
    order = np.random.default_rng(1).permutation(300)
    seen = []

    def transform(rows, block):
        seen.append(rows)
        return block[:, ::-1].tocsr()  # stands in for gene alignment

    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with H5adFile(path) as file:
        plan = OrderedReadPlan(mode, 0, 0)
        blocks = list(iter_ordered(file, order, 64, transform, plan, spill_dir, bucket_nnz=500))
    rows = np.concatenate([r for r, _ in blocks])
    np.testing.assert_array_equal(rows, order)
    got = sp.vstack([b for _, b in blocks]).toarray()
    np.testing.assert_array_equal(got, X.toarray()[order][:, ::-1])
    assert sorted(np.concatenate(seen)) == list(range(300))  # every row transformed once
    assert all(len(r) <= 64 for r, _ in blocks)
    assert list(spill_dir.iterdir()) == []  # spill files removed
