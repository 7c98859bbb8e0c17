"""Zarr v3 store: exact round trip, group ranges, atomic publish, verification, errors."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.blocks import CellBlock, StoreSpec
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import make_writer, open_store, verify_store
from latentcell.data_pipelines.zarr_store import ZarrStoreReader, ZarrStoreWriter
from tests.data_pipelines import store_checks
from tests.data_pipelines.store_checks import assert_blocks_equal, expected_groups

N_GENES = 37
SIZES = [0, 7, 130, 1, 45, 300, 2]  # uneven, with an empty block; 485 cells


def make_spec(with_batch: bool = True) -> StoreSpec:
    keys = [f"ENSG{i:05d}" for i in range(N_GENES)]
    var = pd.DataFrame(
        {"gene_id": keys, "gene_symbol": [f"G{i}" if i % 5 else "" for i in range(N_GENES)]},
        index=pd.Index(keys, name="gene_key"),
    )
    categories = {
        "cell_type": ["T", "B", "NK"],
        "perturbation": ["control", "KO1", "KO2", "KO3"],
        "_source_file": ["a.h5ad", "b.h5ad"],
    }
    if with_batch:
        categories["batch"] = ["b0", "b1"]
    return StoreSpec(
        var=var,
        categories=categories,
        numeric_dtypes={"_source_row": "int64", "n_genes": "int64", "pct_mt": "float64"},
        roles={
            "cell_type": "cell_type",
            "perturbation": "perturbation",
            "batch": "batch" if with_batch else None,
        },
        control_label="control",
        inputs=[{"path": "a.h5ad", "n_cells": 1}],
        build_options={"seed": 0},
    )


def make_blocks(spec: StoreSpec, sizes=SIZES, seed: int = 0) -> list[CellBlock]:
    """Random blocks with empty rows; obs sorted into runs so groups span blocks."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    X = sp.random(n, N_GENES, density=0.15, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    X = X.tolil()
    X[::9] = 0  # empty rows
    X = X.tocsr()
    X.eliminate_zeros()
    codes = {
        col: np.sort(rng.integers(-1 if col == "cell_type" else 0, len(cats), n)).astype(np.int32)
        for col, cats in spec.categories.items()
    }
    codes["perturbation"] = np.repeat(np.arange(4, dtype=np.int32), -(-n // 4))[:n]
    numeric = {
        "_source_row": np.arange(n, dtype=np.int64),
        "n_genes": np.diff(X.indptr).astype(np.int64),
        "pct_mt": rng.random(n),
    }
    full = CellBlock(
        X=X,
        rows=np.full(n, -1, np.int64),
        library_size=np.asarray(X.sum(axis=1), dtype=np.float32).ravel(),
        codes=codes,
        numeric=numeric,
        names=np.array([f"cell-{i}-{'x' * (i % 4)}" for i in range(n)]),
    )
    bounds = np.cumsum([0, *sizes])
    return [full.take(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write(path, spec, blocks, **opts) -> str:
    return store_checks.write("zarr", path, spec, blocks, **opts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = make_spec()
    blocks = make_blocks(spec)
    path = write(tmp_path_factory.mktemp("z") / "store", spec, blocks, chunk_cells=64, nnz_chunk=50)
    return path, spec, CellBlock.concat(blocks)


def test_round_trip_every_unit_and_range(store):
    path, spec, full = store
    r = open_store(path, names=True)
    assert isinstance(r, ZarrStoreReader)
    m = r.meta
    assert (m.format, m.n_cells, m.n_genes) == ("zarr", 485, N_GENES)
    pd.testing.assert_frame_equal(m.var, spec.var)
    assert m.categories == spec.categories
    assert m.numeric_columns == list(spec.numeric_dtypes)
    assert m.roles == spec.roles and m.control_label == "control"
    np.testing.assert_array_equal(m.unit_sizes, [64] * 7 + [37])  # final partial chunk
    assert m.manifest["nnz"] == full.X.nnz and m.manifest["nnz_chunk"] == 50
    assert (
        m.manifest["category_counts"]["perturbation"]
        == np.bincount(full.codes["perturbation"]).tolist()
    )
    for k in range(len(m.unit_sizes)):
        rows = np.arange(64 * k, min(64 * (k + 1), 485))
        assert_blocks_equal(r.read_unit(k), full.take(rows), rows)
    for a, b in [(0, 485), (63, 65), (100, 100), (5, 6), (200, 485)]:
        assert_blocks_equal(r.read_rows(a, b), full.take(np.arange(a, b)), np.arange(a, b))
    with pytest.raises(IndexError):
        r.read_rows(480, 486)
    with pytest.raises(IndexError):
        r.read_unit(8)


def test_group_ranges_are_runs_of_role_codes(store):
    path, spec, full = store
    got = open_store(path).group_index()
    pd.testing.assert_frame_equal(got, expected_groups(full, spec))
    assert got["start"].iloc[0] == 0 and got["stop"].iloc[-1] == full.n_cells


def test_role_without_column_is_minus_one(tmp_path):
    spec = make_spec(with_batch=False)
    blocks = make_blocks(spec, sizes=[50, 20])
    r = open_store(write(tmp_path / "s", spec, blocks, chunk_cells=16))
    groups = r.group_index()
    assert (groups["batch"] == -1).all()
    pd.testing.assert_frame_equal(groups, expected_groups(CellBlock.concat(blocks), spec))


@pytest.mark.parametrize(
    "opts",
    [
        {"codec": "none", "index_dtype": "uint16"},
        {"codec": "zstd-1"},
        {"codec": "blosc-zstd", "nnz_chunk": None},
    ],
)
def test_codecs_and_readers_agree(tmp_path, opts):
    spec = make_spec()
    blocks = make_blocks(spec, sizes=[90, 3, 40], seed=1)
    full = CellBlock.concat(blocks)
    path = write(tmp_path / "s", spec, blocks, chunk_cells=32, **opts)
    rows = np.arange(20, 120)
    for direct in (True, False):  # the chunk-file fast path and zarr's own API
        r = ZarrStoreReader(path, names=True, direct=direct)
        assert_blocks_equal(r.read_rows(20, 120), full.take(rows), rows)
    cold = ZarrStoreReader(path, names=False, cache_bytes=0)  # no in-memory obs columns
    assert_blocks_equal(cold.read_rows(20, 120), full.take(rows), rows, names=False)


def _sum_unit(reader):
    return float(reader.read_unit(1).X.sum())


def test_reader_pickles_and_reopens_in_a_forked_worker(store):
    path, _, full = store
    r = open_store(path, names=True)
    r.read_unit(0)  # open handles in this process first
    clone = pickle.loads(pickle.dumps(r))
    assert clone._opened is None
    assert_blocks_equal(clone.read_unit(0), full.take(np.arange(64)), np.arange(64))
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_sum_unit, (r,)) == pytest.approx(full.X[64:128].sum())


def test_error_mid_build_leaves_nothing(tmp_path):
    spec = make_spec()
    blocks = make_blocks(spec)
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="boom"), ZarrStoreWriter(out, spec, chunk_cells=16) as w:
        for b in blocks[:4]:
            w.append(b)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    bad = blocks[2].take(np.arange(3))
    bad.X = sp.csr_matrix((3, N_GENES + 1), dtype=np.float32)
    with pytest.raises(ValueError, match="genes"), ZarrStoreWriter(out, spec) as w:
        w.append(blocks[1])
        w.append(bad)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(tmp_path):
    spec = make_spec()
    out = tmp_path / "s"
    write(out, spec, make_blocks(spec, sizes=[10]))
    with pytest.raises(DataValidationError, match="--overwrite") as err:
        ZarrStoreWriter(out, spec)
    assert str(out) in str(err.value)
    write(out, spec, make_blocks(spec, sizes=[25]), overwrite=True)
    assert open_store(out).meta.n_cells == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_verify_store_detects_a_tampered_chunk(tmp_path):
    spec = make_spec()
    path = write(tmp_path / "s", spec, make_blocks(spec), chunk_cells=64)
    assert verify_store(path) == []
    chunk = sorted((tmp_path / "s" / "X" / "data" / "c").iterdir())[0]
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = verify_store(path)
    assert len(problems) == 1 and problems[0].startswith("X/data: checksum mismatch")


def test_open_store_errors(tmp_path):
    with pytest.raises(DataValidationError, match="no such file"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="not a latentcell store"):
        open_store(tmp_path / "empty")
    spec = make_spec()
    w = ZarrStoreWriter(tmp_path / "s", spec, chunk_cells=16)  # half-written: never finished
    for b in make_blocks(spec)[:3]:
        w.append(b)
    with pytest.raises(DataValidationError, match="incomplete store"):
        open_store(w._atomic.tmp)
    w.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]
    with pytest.raises(DataValidationError, match="unknown store format"):
        make_writer("parquet", tmp_path / "p", spec)


def test_writes_only_whole_chunks(tmp_path, monkeypatch):
    """Blocks of any size never cause a partial write of an interior chunk (no re-writes)."""
    import zarr

    writes = []
    original = zarr.Array.__setitem__

    def spy(self, key, value):
        writes.append((self.path, self.chunks[0], key.start or 0, key.stop))
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    spec = make_spec()
    blocks = make_blocks(spec)
    r = open_store(write(tmp_path / "s", spec, blocks, chunk_cells=16, nnz_chunk=50))
    final = {"X/indptr": r.meta.n_cells + 1, "X/data": r.meta.manifest["nnz"]}
    seen = set()
    for path, chunk, start, stop in writes:
        if not path.startswith(("X/", "obs/", "library_size")):
            continue
        end = final.get(path, final.get("X/data") if path == "X/indices" else r.meta.n_cells)
        assert start % chunk == 0 and (stop % chunk == 0 or stop == end), (path, start, stop)
        chunks = set(range(start // chunk, -(-stop // chunk)))
        assert not chunks & {c for p, c in seen if p == path}, f"{path} chunk written twice"
        seen |= {(path, c) for c in chunks}
