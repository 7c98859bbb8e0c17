"""H5adStreamWriter: chunked CSR output that anndata reads exactly, published atomically."""

from __future__ import annotations

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.h5ad_stream_writer import H5adStreamWriter


def _example(n_obs: int = 57, n_vars: int = 13, seed: int = 0) -> anndata.AnnData:
    """Counts with empty rows, a categorical, numeric and bool obs, nested uns."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_obs, n_vars, density=0.3, format="csr", dtype=np.float32, rng=rng)
    X.data = np.ceil(X.data * 20)
    row_scale = np.ones(n_obs, dtype=np.float32)
    row_scale[5] = 0  # an empty row
    X = sp.csr_matrix(sp.diags(row_scale) @ X)
    X.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "NK"], n_obs)),
            "umis": np.asarray(X.sum(axis=1)).ravel().astype(np.int64),
            "score": rng.normal(size=n_obs),
            "flag": rng.random(n_obs) < 0.5,
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(
        {"gene_id": [f"ENSG{i:011d}" for i in range(n_vars)]},
        index=[f"GENE{i}" for i in range(n_vars)],
    )
    uns = {
        "source": "test",
        "truth": {"W": rng.normal(size=(n_vars, 3)), "names": np.array(["a", "bb"]), "k": 0.25},
    }
    return anndata.AnnData(X=X, obs=obs, var=var, uns=uns)


def _write_streamed(adata: anndata.AnnData, path, cuts=(0, 10, 10, 31, None), **kwargs):
    """Write ``adata`` through the stream writer in uneven chunks (one of them empty)."""
    bounds = [c if c is not None else adata.n_obs for c in cuts]
    with H5adStreamWriter(path, adata.n_vars, **kwargs) as writer:
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            writer.append(adata.X[start:stop])
        return writer.close(adata.obs, adata.var, adata.uns)


def _assert_same(got: anndata.AnnData, want: anndata.AnnData) -> None:
    assert got.shape == want.shape
    assert isinstance(got.X, sp.csr_matrix | sp.csr_array)
    assert got.X.dtype == np.float32
    np.testing.assert_array_equal(got.X.toarray(), want.X.toarray())
    pd.testing.assert_frame_equal(got.obs, want.obs)
    pd.testing.assert_frame_equal(got.var, want.var)
    assert got.uns["source"] == want.uns["source"]
    np.testing.assert_array_equal(got.uns["truth"]["W"], want.uns["truth"]["W"])
    assert list(got.uns["truth"]["names"]) == list(want.uns["truth"]["names"])
    assert got.uns["truth"]["k"] == want.uns["truth"]["k"]


@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
def test_round_trip_matches_anndata(tmp_path, compression):
    want = _example()
    path = _write_streamed(want, tmp_path / "x.h5ad", compression=compression)
    _assert_same(anndata.read_h5ad(path), want)
    # anndata writing the same object reads back identically too
    want.write_h5ad(tmp_path / "ref.h5ad")
    _assert_same(anndata.read_h5ad(tmp_path / "ref.h5ad"), anndata.read_h5ad(path))


def test_on_disk_layout_is_anndata_csr(tmp_path):
    path = _write_streamed(_example(), tmp_path / "x.h5ad")
    with h5py.File(path, "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        x = f["X"]
        assert x.attrs["encoding-type"] == "csr_matrix"
        assert x.attrs["encoding-version"] == "0.1.0"
        assert tuple(x.attrs["shape"]) == (57, 13)
        assert (x["data"].dtype, x["indices"].dtype, x["indptr"].dtype) == (
            np.float32,
            np.int32,
            np.int64,
        )
        assert x["data"].maxshape == (None,)


def test_backed_read(tmp_path):
    want = _example()
    path = _write_streamed(want, tmp_path / "x.h5ad")
    backed = anndata.read_h5ad(path, backed="r")
    try:
        assert backed.shape == want.shape
        np.testing.assert_array_equal(backed.X[7:40].toarray(), want.X[7:40].toarray())
        pd.testing.assert_frame_equal(backed.obs, want.obs)
    finally:
        backed.file.close()


def test_dense_and_unsorted_chunks_become_canonical_csr(tmp_path):
    dense = np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float64)
    unsorted = sp.csr_matrix(
        (np.array([5.0, 4.0]), np.array([2, 0]), np.array([0, 2])), shape=(1, 3)
    )
    obs = pd.DataFrame(index=["a", "b", "c"])
    var = pd.DataFrame(index=["g0", "g1", "g2"])
    with H5adStreamWriter(tmp_path / "x.h5ad", 3) as writer:
        writer.append(dense)
        writer.append(unsorted)
        path = writer.close(obs, var)
    got = anndata.read_h5ad(path).X
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), [[0, 2, 0], [1, 0, 3], [4, 0, 5]])


def test_exception_leaves_no_file_and_keeps_old_destination(tmp_path):
    dest = tmp_path / "x.h5ad"
    dest.write_bytes(b"previous")
    with pytest.raises(KeyError), H5adStreamWriter(dest, 4) as writer:
        writer.append(sp.csr_matrix(np.ones((2, 4), np.float32)))
        raise KeyError("boom")
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]


def test_leaving_without_close_removes_the_file(tmp_path):
    with (
        pytest.raises(RuntimeError, match="without close"),
        H5adStreamWriter(tmp_path / "x.h5ad", 4) as writer,
    ):
        writer.append(np.zeros((1, 4)))
    assert list(tmp_path.iterdir()) == []


def test_shape_checks(tmp_path):
    with H5adStreamWriter(tmp_path / "x.h5ad", 4) as writer:
        with pytest.raises(ValueError, match="columns"):
            writer.append(np.zeros((2, 5)))
        writer.append(np.zeros((2, 4)))
        with pytest.raises(ValueError, match="obs has 3 rows"):
            writer.close(pd.DataFrame(index=["a", "b", "c"]), pd.DataFrame(index=list("wxyz")))
        writer.abort()
    assert list(tmp_path.iterdir()) == []
