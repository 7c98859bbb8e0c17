"""End to end: h5ad inputs -> build_store -> open_store -> the same cells, genes and labels."""

from __future__ import annotations

import argparse
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.build import add_build_arguments, build_store, run_build
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.schemas import IMPLICIT_LABEL
from latentcell.data_pipelines.stores import open_store
from tests.data_pipelines.test_h5ad_input import counts, vcc_obs, write_h5ad

E = [f"ENSG{i:011d}" for i in range(40)]


def read_back(out: str) -> tuple:
    """(meta, block of every row, obs labels DataFrame) of a built store."""
    reader = open_store(out, names=True)
    meta = reader.meta
    block = reader.read_rows(0, meta.n_cells)
    labels = pd.DataFrame(
        {c: np.asarray(cats, dtype=object)[block.codes[c]] for c, cats in meta.categories.items()}
    )
    for c in meta.numeric_columns:
        labels[c] = block.numeric[c]
    return reader, block, labels


def aligned_input(path: str, store_genes: list[str], input_genes: list[str]) -> np.ndarray:
    """The input's dense counts with columns reindexed to the store's genes (zero-filled)."""
    import anndata as ad

    dense = ad.read_h5ad(path).X
    dense = dense.toarray() if sp.issparse(dense) else np.asarray(dense)
    out = np.zeros((dense.shape[0], len(store_genes)), dtype=np.float32)
    for j, key in enumerate(store_genes):
        if key in input_genes:
            out[:, j] = dense[:, input_genes.index(key)]
    return out


def assert_groups_contiguous(reader, labels: pd.DataFrame) -> None:
    """Within one input file, every (cell_type, perturbation, batch) group is one row range."""
    roles = reader.meta.roles
    cols = [roles[r] for r in ("cell_type", "perturbation", "batch") if roles[r]]
    key = labels[[*cols, "_source_file"]].astype(str).agg("|".join, axis=1)
    runs = key.ne(key.shift()).cumsum()
    assert runs.groupby(key).nunique().max() == 1
    index = reader.group_index()
    assert index["start"].iloc[0] == 0 and index["stop"].iloc[-1] == reader.meta.n_cells
    assert (index["start"].to_numpy()[1:] == index["stop"].to_numpy()[:-1]).all()


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_round_trip_single_vcc_input(tmp_path, fmt):
    X = counts(150, 12, seed=1)
    obs = vcc_obs(150, seed=1)
    var = pd.DataFrame({"gene_id": E[:12]}, index=[f"S{j}" for j in range(12)])
    path = write_h5ad(tmp_path / "vcc.h5ad", X, obs=obs, var=var)
    out = build_store([path], tmp_path / "store", format=fmt, schema="vcc", read_cells=16)

    reader, block, labels = read_back(out)
    meta = reader.meta
    assert meta.n_cells == 150 and list(meta.var.index) == E[:12]
    assert list(meta.var["gene_symbol"]) == [f"S{j}" for j in range(12)]
    assert meta.roles == {"cell_type": "cell_type", "perturbation": "target_gene", "batch": "batch"}
    assert meta.control_label == "non-targeting"
    assert set(labels["cell_type"]) == {IMPLICIT_LABEL}

    rows = labels["_source_row"].to_numpy()
    assert sorted(rows) == list(range(150))
    np.testing.assert_array_equal(block.X.toarray(), X.toarray()[rows])
    np.testing.assert_allclose(block.library_size, X.toarray()[rows].sum(axis=1))
    assert list(block.names) == list(obs.index[rows])
    for col in ("target_gene", "batch", "guide_id"):
        assert list(labels[col]) == list(obs[col].astype(str).to_numpy()[rows])
    np.testing.assert_array_equal(labels["depth"], obs["depth"].to_numpy()[rows])
    assert labels["n_counts"].dtype == np.int64
    assert set(labels["_source_file"]) == {path}
    assert_groups_contiguous(reader, labels)
    for _, group in labels.groupby(["target_gene", "batch"]):
        assert (np.diff(group["_source_row"].to_numpy()) > 0).all()  # stable within a group

    manifest = meta.manifest
    assert manifest["inputs"][0]["path"] == path and manifest["inputs"][0]["n_cells"] == 150
    assert manifest["inputs"][0]["schema"] == "vcc"
    assert manifest["build"]["roles"]["batch"] == "batch"
    assert manifest["build"]["implicit_label"] == IMPLICIT_LABEL


def _two_inputs(tmp_path) -> tuple[str, str]:
    """Symbol-only inputs with different genes and obs columns (auto schema)."""
    obs_a = vcc_obs(60, seed=2).assign(cell_type=pd.Categorical(["K562"] * 60))
    obs_b = vcc_obs(45, seed=3, targets=("g3",), batches=("b9",)).drop(columns="n_counts")
    a = write_h5ad(tmp_path / "a.h5ad", counts(60, 5, seed=2), obs_a, genes=list("ABCDE"))
    b = write_h5ad(tmp_path / "b.h5ad", counts(45, 4, seed=3), obs_b, genes=list("DBFG"))
    return a, b


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_multi_file_union_zero_fills(tmp_path, fmt):
    a, b = _two_inputs(tmp_path)
    out = build_store([a, b], tmp_path / "store", format=fmt, read_cells=7)
    reader, block, labels = read_back(out)
    genes = list(reader.meta.var.index)
    assert genes == list("ABCDEFG")
    for path, input_genes in ((a, list("ABCDE")), (b, list("DBFG"))):
        mine = (labels["_source_file"] == path).to_numpy()
        expected = aligned_input(path, genes, input_genes)[labels["_source_row"][mine]]
        np.testing.assert_array_equal(block.X[mine].toarray(), expected)
    from_b = labels["_source_file"] == b
    assert set(labels["cell_type"][from_b]) == {IMPLICIT_LABEL}
    assert set(labels["cell_type"][~from_b]) == {"K562"}
    assert labels["n_counts"].dtype == np.float64 and labels["n_counts"][from_b].isna().all()
    cats = reader.meta.categories["target_gene"]
    assert cats[0] == "g1" or "non-targeting" in cats
    assert set(cats) == {"non-targeting", "g1", "g2", "g3"}
    assert_groups_contiguous(reader, labels)
    assert [i["n_cells"] for i in reader.meta.manifest["inputs"]] == [60, 45]


def test_intersection_and_gene_list(tmp_path):
    a, b = _two_inputs(tmp_path)
    out = build_store([a, b], tmp_path / "inter", gene_join="intersection")
    assert list(open_store(out).meta.var.index) == ["B", "D"]
    genes = tmp_path / "genes.txt"
    genes.write_text("G\nA\nQ\n")
    with pytest.warns(UserWarning, match="occur in no input"):
        out = build_store([a, b], tmp_path / "listed", genes_file=genes)
    reader, block, labels = read_back(out)
    assert list(reader.meta.var.index) == ["G", "A", "Q"]
    assert block.X[:, 2].nnz == 0
    assert reader.meta.manifest["build"]["genes"]["genes_unknown"] == ["Q"]
    from_a = (labels["_source_file"] == a).to_numpy()
    expected = aligned_input(a, ["G", "A", "Q"], list("ABCDE"))[labels["_source_row"][from_a]]
    np.testing.assert_array_equal(block.X[from_a].toarray(), expected)


def test_hvg_with_combined_targets(tmp_path):
    rng = np.random.default_rng(0)
    n_cells, n_genes = 400, 60
    mu = np.exp(rng.uniform(-1, 2, n_genes))
    rates = np.tile(mu, (n_cells, 1))
    hot = [5, 17, 40]
    rates[:, hot] *= np.where(rng.random((n_cells, 3)) < 0.33, 3.0, 0.0)
    X = sp.csr_matrix(rng.poisson(rates).astype(np.float32))
    genes = [f"G{j}" for j in range(n_genes)]
    obs = vcc_obs(n_cells, targets=("G50", "G2", "NOTAGENE"))
    path = write_h5ad(tmp_path / "a.h5ad", X, obs=obs, genes=genes)
    out = build_store(
        [path], tmp_path / "store", schema="vcc", hvg=3, combine_targets=True, read_cells=50
    )
    reader, block, labels = read_back(out)
    assert list(reader.meta.var.index) == ["G2", "G5", "G17", "G40", "G50"]  # vocabulary order
    hvg = reader.meta.manifest["build"]["hvg"]
    assert hvg["n_top_genes"] == 3 and hvg["targets_missing"] == ["NOTAGENE"]
    assert hvg["n_cells_used"] == n_cells
    expected = X.toarray()[labels["_source_row"]][:, [2, 5, 17, 40, 50]]
    np.testing.assert_array_equal(block.X.toarray(), expected)
    np.testing.assert_allclose(block.library_size, expected.sum(axis=1))

    out = build_store([path], tmp_path / "sampled", schema="vcc", hvg=3, hvg_sample_cells=200)
    meta = open_store(out).meta
    assert list(meta.var.index) == ["G5", "G17", "G40"]
    assert meta.manifest["build"]["hvg"]["n_cells_used"] == 200


# ---------------------------------------------------------------- every error, nothing written


def _bad_value(tmp_path, value) -> str:
    X = counts(80, 6, seed=4).toarray()
    X[71, 2] = value  # late in the file: blocks before it were already appended
    return write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(X))


def _no_x(tmp_path) -> str:
    path = tmp_path / "bad.h5ad"
    with h5py.File(path, "w") as f:
        f.create_dataset("obs", data=np.zeros(3))
    return str(path)


def _text(tmp_path) -> str:
    path = tmp_path / "bad.h5ad"
    path.write_text("not hdf5")
    return str(path)


def _duplicate_genes(tmp_path) -> str:
    var = pd.DataFrame({"gene_id": [E[0], E[1], E[0]]}, index=["A", "B", "C"])
    return write_h5ad(tmp_path / "bad.h5ad", counts(10, 3), var=var)


def _no_control(tmp_path) -> str:
    obs = vcc_obs(10).assign(target_gene=pd.Categorical(["g1"] * 10))
    return write_h5ad(tmp_path / "bad.h5ad", counts(10, 4), obs=obs)


BAD_INPUTS = {
    "missing file": (lambda tmp: str(tmp / "absent.h5ad"), "file not found"),
    "not hdf5": (_text, "not HDF5"),
    "hdf5 without X": (_no_x, "HDF5 without X"),
    "missing obs column": (
        lambda tmp: write_h5ad(tmp / "bad.h5ad", counts(10, 4), vcc_obs(10).drop(columns="batch")),
        "missing obs column 'batch'",
    ),
    "no control cells": (_no_control, "no control cells"),
    "duplicate genes": (_duplicate_genes, "duplicate gene names"),
    "no cells": (
        lambda tmp: write_h5ad(tmp / "bad.h5ad", sp.csr_matrix((0, 4)), vcc_obs(0)),
        "empty matrix",
    ),
    "no genes": (lambda tmp: write_h5ad(tmp / "bad.h5ad", sp.csr_matrix((5, 0))), "empty matrix"),
    "negative": (lambda tmp: _bad_value(tmp, -2.0), "negative value"),
    "non-integer": (lambda tmp: _bad_value(tmp, 1.5), "non-integer"),
    "nan": (lambda tmp: _bad_value(tmp, np.nan), "NaN"),
    "inf": (lambda tmp: _bad_value(tmp, np.inf), "NaN or infinite"),
}


def _assert_nothing_written(tmp_path) -> None:
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


VALUE_ERRORS = ("negative", "non-integer", "nan", "inf")  # raised mid-stream, inside the writer
CASES = [(case, "zarr") for case in sorted(BAD_INPUTS)]
CASES += [(case, "webdataset") for case in VALUE_ERRORS]


@pytest.mark.parametrize(("case", "fmt"), CASES)
def test_every_validation_error_leaves_nothing(tmp_path, case, fmt):
    good = write_h5ad(tmp_path / "good.h5ad", counts(50, 6, seed=9), vcc_obs(50, seed=9))
    make_bad, problem = BAD_INPUTS[case]
    bad = make_bad(tmp_path)
    with pytest.raises(DataValidationError, match=problem) as err:
        build_store([good, bad], tmp_path / "store", format=fmt, schema="vcc", read_cells=8)
    assert err.value.path.endswith("bad.h5ad") or "absent" in err.value.path
    assert "\n" not in str(err.value) and err.value.fix
    _assert_nothing_written(tmp_path)


def test_value_error_in_hvg_pass_and_row_named(tmp_path):
    bad = _bad_value(tmp_path, 0.25)
    with pytest.raises(DataValidationError, match=r"row 71 \(obs 'cell0_71'\)") as err:
        build_store([bad], tmp_path / "store", schema="vcc", hvg=3, read_cells=8)
    assert err.value.field == "X"
    _assert_nothing_written(tmp_path)
    build_store([bad], tmp_path / "store", schema="vcc", integer_counts=False)
    assert (tmp_path / "store").exists()


def test_conflicting_gene_ids_leave_nothing(tmp_path):
    var_a = pd.DataFrame({"gene_id": [E[0], E[1]]}, index=["A", "B"])
    var_b = pd.DataFrame({"gene_id": [E[2], E[1]]}, index=["A", "B"])
    a = write_h5ad(tmp_path / "a.h5ad", counts(10, 2), var=var_a)
    b = write_h5ad(tmp_path / "b.h5ad", counts(10, 2), var=var_b)
    with pytest.raises(DataValidationError, match="gene symbol 'A'"):
        build_store([a, b], tmp_path / "store", schema="vcc")
    _assert_nothing_written(tmp_path)


def test_existing_output_and_option_errors(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad", counts(20, 4))
    (tmp_path / "store").mkdir()
    with pytest.raises(DataValidationError, match="--overwrite"):
        build_store([path], tmp_path / "store")
    out = build_store([path], tmp_path / "store", overwrite=True)
    assert open_store(out).meta.n_cells == 20
    with pytest.raises(ValueError, match="alternatives"):
        build_store([path], tmp_path / "x", hvg=2, genes_file="g.txt")
    with pytest.raises(ValueError, match="needs --hvg"):
        build_store([path], tmp_path / "x", combine_targets=True)
    with pytest.raises(ValueError, match="do not apply"):
        build_store([path], tmp_path / "x", format="zarr", block_cells=4)
    with pytest.raises(DataValidationError, match="listed twice"):
        build_store([path, path], tmp_path / "x")


def test_cli(tmp_path, capsys):
    path = write_h5ad(tmp_path / "a.h5ad", counts(30, 4))
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args(
        [path, "--out", str(tmp_path / "s"), "--format", "webdataset", "--schema", "vcc"]
        + ["--hvg", "2", "--combine-targets", "--block-cells", "8"]
    )
    assert run_build(args) == 0
    assert "built" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "webdataset" and manifest["build"]["hvg"]["combine_targets"]
    from latentcell.launch.cli import main  # errors leave through the CLI's edge

    assert main(["data", "build", path, "--out", str(tmp_path / "t"), "--pert-col", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "obs/nope" in err and err.count("\n") == 1


@pytest.mark.real_data
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_papalexi_builds(shared_file, tmp_path, fmt):
    path = str(shared_file("papalexi2021_thp1_sceptre_lowmoi.h5ad"))
    out = build_store([path], tmp_path / "store", format=fmt, schema="vcc", batch_col="bio_rep")
    reader = open_store(out, names=True)
    meta = reader.meta
    assert (meta.n_cells, meta.n_genes) == (20729, 299)
    assert meta.roles["batch"] == "bio_rep" and meta.control_label == "non-targeting"
    assert len(reader.group_index()) == 26 * 3  # one range per (target, replicate)
    block = reader.read_rows(0, 500)
    rows = block.numeric["_source_row"]
    from latentcell.data_pipelines.h5ad_input import H5adFile

    with H5adFile(path) as file:
        assert (file.read_rows(rows) != block.X).nnz == 0


@pytest.fixture
def force_spill(monkeypatch):
    """Make every input take the spill-sort path (normally chosen only for large files)."""
    import latentcell.data_pipelines.build as build_module
    from latentcell.data_pipelines.h5ad_input import OrderedReadPlan

    monkeypatch.setattr(
        build_module, "plan_ordered_read", lambda file, order, cells: OrderedReadPlan("spill", 0, 0)
    )


def test_spill_sorted_build_round_trips(tmp_path, force_spill):
    a, b = _two_inputs(tmp_path)
    out = build_store([a, b], tmp_path / "store", read_cells=9, bucket_nnz=40)
    reader, block, labels = read_back(out)
    assert [i["read_mode"] for i in reader.meta.manifest["inputs"]] == ["spill", "spill"]
    genes = list(reader.meta.var.index)
    for path, input_genes in ((a, list("ABCDE")), (b, list("DBFG"))):
        mine = (labels["_source_file"] == path).to_numpy()
        expected = aligned_input(path, genes, input_genes)[labels["_source_row"][mine]]
        np.testing.assert_array_equal(block.X[mine].toarray(), expected)
    assert_groups_contiguous(reader, labels)
    assert not [p for p in tmp_path.iterdir() if "spill" in p.name]


def test_spill_validation_error_leaves_nothing(tmp_path, force_spill):
    good = write_h5ad(tmp_path / "good.h5ad", counts(50, 6, seed=9), vcc_obs(50, seed=9))
    bad = _bad_value(tmp_path, -1.0)
    with pytest.raises(DataValidationError, match="row 71"):
        build_store([good, bad], tmp_path / "store", schema="vcc", read_cells=8, bucket_nnz=30)
    _assert_nothing_written(tmp_path)
    assert not [p for p in tmp_path.iterdir() if "spill" in p.name]


def test_obs_problems_are_caught_before_writing(tmp_path):
    obs = vcc_obs(20)
    obs["target_gene"] = obs["target_gene"].astype(object)
    obs.iloc[4, obs.columns.get_loc("target_gene")] = None
    path = write_h5ad(tmp_path / "bad.h5ad", counts(20, 4), obs=obs)
    with pytest.raises(DataValidationError, match="1 cells have no target_gene label"):
        build_store([path], tmp_path / "store", schema="vcc", hvg=2)
    reserved = write_h5ad(tmp_path / "r.h5ad", counts(20, 4), obs=vcc_obs(20).assign(_source_row=1))
    with pytest.raises(DataValidationError, match="reserved"):
        build_store([reserved], tmp_path / "store")
    a = write_h5ad(tmp_path / "a.h5ad", counts(20, 4), obs=vcc_obs(20))
    b = write_h5ad(
        tmp_path / "b.h5ad", counts(20, 4), obs=vcc_obs(20).rename(columns={"batch": "gem_group"})
    )
    with pytest.raises(DataValidationError, match="different batch columns"):
        build_store([a, b], tmp_path / "store")
    _assert_nothing_written(tmp_path)


def test_numeric_role_columns_become_categories(tmp_path):
    obs = vcc_obs(30).assign(batch=np.arange(30) % 3)
    path = write_h5ad(tmp_path / "a.h5ad", counts(30, 4), obs=obs)
    meta = open_store(build_store([path], tmp_path / "store", schema="vcc")).meta
    assert meta.categories["batch"] == ["0", "1", "2"]
    assert "n_counts" in meta.numeric_columns and "batch" not in meta.numeric_columns


def test_scbasecount_samples_with_different_genes(tmp_path):
    def sample(name, genes, n, cell_type):
        rng = np.random.default_rng(len(name))
        obs = pd.DataFrame(
            {"SRX_accession": [name] * n, "umi_count_Unique": rng.integers(1, 9, n)},
            index=[f"{name}_{i}" for i in range(n)],
        )
        if cell_type:
            obs["cell_type"] = rng.choice(["T", "B"], n)
        var = pd.DataFrame({"gene_symbols": [f"S{g}" for g in genes]}, index=[E[g] for g in genes])
        return write_h5ad(tmp_path / f"{name}.h5ad", counts(n, len(genes), seed=n), obs, var=var)

    a = sample("SRX1", [0, 1, 2, 3], 30, cell_type=True)
    b = sample("SRX2", [2, 5, 0], 20, cell_type=False)
    out = build_store([a, b], tmp_path / "store", schema="scbasecount", format="webdataset")
    reader, block, labels = read_back(out)
    meta = reader.meta
    assert list(meta.var.index) == [E[0], E[1], E[2], E[3], E[5]]
    assert list(meta.var["gene_symbol"]) == ["S0", "S1", "S2", "S3", "S5"]
    assert meta.roles == {"cell_type": "cell_type", "perturbation": None, "batch": "SRX_accession"}
    assert meta.control_label is None
    from_b = (labels["_source_file"] == b).to_numpy()
    assert set(labels["cell_type"][from_b]) == {IMPLICIT_LABEL}
    expected = aligned_input(b, list(meta.var.index), [E[2], E[5], E[0]])
    np.testing.assert_array_equal(
        block.X[from_b].toarray(), expected[labels["_source_row"][from_b]]
    )
    assert_groups_contiguous(reader, labels)
