"""WebDataset store: exact round trip, samples and shards, atomic publish, verification."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import webdataset as wds

from latentcell.data_pipelines.blocks import CellBlock, StoreSpec
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.npz_reader import read_npz
from latentcell.data_pipelines.stores import open_store, verify_store
from latentcell.data_pipelines.webdataset_store import (
    WebDatasetStoreReader,
    WebDatasetStoreWriter,
    decode_sample,
    encode_sample,
)
from tests.data_pipelines import store_checks
from tests.data_pipelines.store_checks import assert_blocks_equal, expected_groups

N_GENES = 29
SIZES = [0, 5, 61, 1, 40, 100, 3]  # uneven, with an empty block; 210 cells


def make_spec(with_batch: bool = True) -> StoreSpec:
    keys = [f"ENSG{i:05d}" for i in range(N_GENES)]
    var = pd.DataFrame(
        {"gene_id": keys, "gene_symbol": [f"G{i}" for i in range(N_GENES)]},
        index=pd.Index(keys, name="gene_key"),
    )
    categories = {"cell_type": ["T", "B"], "perturbation": ["control", "KO1", "KO2"]}
    categories["_source_file"] = ["a.h5ad"]
    if with_batch:
        categories["batch"] = ["b0", "b1", "b2"]
    return StoreSpec(
        var=var,
        categories=categories,
        numeric_dtypes={"_source_row": "int64", "score": "float64", "is_doublet": "bool"},
        roles={
            "cell_type": "cell_type",
            "perturbation": "perturbation",
            "batch": "batch" if with_batch else None,
        },
        control_label="control",
        inputs=[{"path": "a.h5ad", "n_cells": 210}],
        build_options={},
    )


def make_blocks(spec: StoreSpec, sizes=SIZES, seed: int = 0) -> list[CellBlock]:
    """Random blocks with empty rows; obs sorted into runs so groups span blocks."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    X = sp.random(n, N_GENES, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 9).astype(np.float32)
    X = X.tolil()
    X[::7] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    codes = {
        c: np.sort(rng.integers(0, len(v), n)).astype(np.int32) for c, v in spec.categories.items()
    }
    full = CellBlock(
        X=X,
        rows=np.full(n, -1, np.int64),
        library_size=np.asarray(X.sum(axis=1), dtype=np.float32).ravel(),
        codes=codes,
        numeric={
            "_source_row": np.arange(n, dtype=np.int64),
            "score": rng.normal(size=n),
            "is_doublet": rng.random(n) < 0.1,
        },
        names=np.array([f"bc{i}" + "A" * (i % 5) for i in range(n)]),
    )
    bounds = np.cumsum([0, *sizes])
    return [full.take(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def write(path, spec, blocks, **opts) -> str:
    return store_checks.write("webdataset", path, spec, blocks, **opts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = make_spec()
    blocks = make_blocks(spec)
    path = tmp_path_factory.mktemp("w") / "store"
    write(path, spec, blocks, block_cells=16, cells_per_shard=48)
    return path, spec, CellBlock.concat(blocks)


def test_round_trip_shards_samples_and_ranges(store):
    path, spec, full = store
    r = open_store(path, names=True)
    assert isinstance(r, WebDatasetStoreReader)
    m = r.meta
    assert (m.format, m.n_cells, m.n_genes) == ("webdataset", 210, N_GENES)
    pd.testing.assert_frame_equal(m.var, spec.var)
    assert m.categories == spec.categories and m.roles == spec.roles
    assert m.numeric_columns == list(spec.numeric_dtypes)
    # 3 samples of 16 cells per shard; the last sample is partial (210 = 13 * 16 + 2)
    np.testing.assert_array_equal(m.unit_sizes, [48, 48, 48, 48, 18])
    shards = m.manifest["shards"]
    assert [s["first_row"] for s in shards] == [0, 48, 96, 144, 192]
    assert [s["n_samples"] for s in shards] == [3, 3, 3, 3, 2]
    assert m.manifest["nnz"] == full.X.nnz
    for k in range(5):
        rows = np.arange(48 * k, min(48 * (k + 1), 210))
        assert_blocks_equal(r.read_unit(k), full.take(rows), rows)
        samples = list(r.iter_unit_blocks(k))
        assert all(b.n_cells == 16 for b in samples[:-1]) and samples[-1].n_cells in (16, 2)
    for a, b in [(0, 210), (47, 49), (30, 30), (17, 18), (100, 210)]:
        assert_blocks_equal(r.read_rows(a, b), full.take(np.arange(a, b)), np.arange(a, b))
    pd.testing.assert_frame_equal(r.group_index(), expected_groups(full, spec))


def test_names_optional_and_reader_pickles(store):
    path, _, full = store
    r = WebDatasetStoreReader(path, names=False)
    clone = pickle.loads(pickle.dumps(r))
    rows = np.arange(48, 96)
    assert_blocks_equal(clone.read_unit(1), full.take(rows), rows, names=False)


def test_shards_stream_through_webdataset(store):
    path, _, full = store
    shard = str(path / "shard-000000.tar")
    samples = list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["000000000000", "000000000016", "000000000032"]
    with np.load(io.BytesIO(samples[1]["cells.npz"])) as z:
        np.testing.assert_array_equal(z["library_size"], full.library_size[16:32])


def test_role_without_column_is_minus_one(tmp_path):
    spec = make_spec(with_batch=False)
    blocks = make_blocks(spec, sizes=[30, 11])
    r = open_store(write(tmp_path / "s", spec, blocks, block_cells=8, cells_per_shard=16))
    assert (r.group_index()["batch"] == -1).all()
    pd.testing.assert_frame_equal(r.group_index(), expected_groups(CellBlock.concat(blocks), spec))


def test_npz_parser_matches_numpy_and_falls_back():
    spec = make_spec()
    block = CellBlock.concat(make_blocks(spec, sizes=[20]))
    block.rows = np.arange(20)
    raw = encode_sample(block)
    z = read_npz(bytearray(raw))
    with np.load(io.BytesIO(raw)) as ref:
        assert sorted(z) == sorted(ref.files)
        for k in ref.files:
            np.testing.assert_array_equal(z[k], ref[k])
            assert z[k].dtype == ref[k].dtype
    buf = io.BytesIO()
    with np.load(io.BytesIO(raw)) as ref:
        np.savez_compressed(buf, **{k: ref[k] for k in ref.files})
    assert read_npz(buf.getvalue()) is None  # compressed members: not ours to parse
    assert_blocks_equal(decode_sample(buf.getvalue(), N_GENES, names=True), block, np.arange(20))


def test_error_mid_build_leaves_nothing(tmp_path):
    spec = make_spec()
    out = tmp_path / "s"
    with (
        pytest.raises(RuntimeError, match="boom"),
        WebDatasetStoreWriter(out, spec, block_cells=8, cells_per_shard=16) as w,
    ):
        for b in make_blocks(spec)[:4]:  # enough to have closed a shard already
            w.append(b)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(tmp_path):
    spec = make_spec()
    out = tmp_path / "s"
    write(out, spec, make_blocks(spec, sizes=[10]))
    with pytest.raises(DataValidationError, match="choose another --out or pass --overwrite"):
        WebDatasetStoreWriter(out, spec)
    write(out, spec, make_blocks(spec, sizes=[25]), overwrite=True)
    assert open_store(out).meta.n_cells == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_verify_store_detects_tampered_and_extra_shards(tmp_path):
    spec = make_spec()
    out = tmp_path / "s"
    write(out, spec, make_blocks(spec), block_cells=16, cells_per_shard=48)
    assert verify_store(out) == []
    shard = out / "shard-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (out / "shard-000099.tar").write_bytes(b"")
    problems = verify_store(out)
    assert len(problems) == 2
    assert problems[0].startswith("shard-000002.tar: checksum mismatch")
    assert "not listed" in problems[1]


def test_open_store_rejects_half_written(tmp_path):
    spec = make_spec()
    w = WebDatasetStoreWriter(tmp_path / "s", spec, block_cells=8, cells_per_shard=16)
    for b in make_blocks(spec)[:4]:
        w.append(b)
    assert any(w._atomic.tmp.glob("*.tar"))
    with pytest.raises(DataValidationError, match="incomplete store"):
        open_store(w._atomic.tmp)
    w.abort()
    assert list(tmp_path.iterdir()) == []
