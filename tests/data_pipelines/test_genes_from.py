"""`latentcell data build --genes-from STORE_OR_RUN`: the new store's genes are exactly the
other store's keys, in its order, with each input's counts under the right gene (found by
key, else by symbol), zero-filled where an input lacks one, and the source in the manifest.
(From a trained run: ``tests/trainer/test_init_from_run.py``.)"""

from __future__ import annotations

import pandas as pd
import pytest

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.launch.cli import main
from tests.data_pipelines.test_build import E, aligned_input, read_back
from tests.data_pipelines.test_h5ad_input import counts, vcc_obs, write_h5ad


def _input(tmp_path, name: str, genes: list[str], seed: int, var=None) -> str:
    X = counts(40, len(genes), seed=seed)
    return write_h5ad(tmp_path / f"{name}.h5ad", X, vcc_obs(40, seed=seed), genes=genes, var=var)


@pytest.fixture
def reference(tmp_path) -> str:
    """A store of genes A..E (symbol keys), in that order."""
    return build_store([_input(tmp_path, "ref", list("ABCDE"), 0)], tmp_path / "ref.zarr")


def test_same_genes_in_another_order_take_the_reference_order(tmp_path, reference):
    path = _input(tmp_path, "other", list("DBEZAC"), 1)  # reordered, plus a gene Z
    out = build_store([path], tmp_path / "other.zarr", genes_from=reference)
    reader, block, labels = read_back(out)
    ref = read_back(reference)[0].meta.var
    assert list(reader.meta.var.index) == list(ref.index) == list("ABCDE")
    pd.testing.assert_frame_equal(reader.meta.var, ref)
    expected = aligned_input(path, list("ABCDE"), list("DBEZAC"))[labels["_source_row"]]
    assert (block.X.toarray() == expected).all()  # Z dropped, every other gene in place
    genes = reader.meta.manifest["build"]["genes"]
    assert genes["genes_from"] == str(reference) and genes["genes_from_kind"] == "store"
    assert genes["genes_unknown"] == []


def test_missing_genes_are_zero_filled(tmp_path, reference):
    path = _input(tmp_path, "part", list("DBFG"), 2)
    with pytest.warns(UserWarning, match="occur in no input"):
        out = build_store([path], tmp_path / "part.zarr", genes_from=reference)
    reader, block, labels = read_back(out)
    assert list(reader.meta.var.index) == list("ABCDE")
    assert reader.meta.manifest["build"]["genes"]["genes_unknown"] == ["A", "C", "E"]
    expected = aligned_input(path, list("ABCDE"), list("DBFG"))[labels["_source_row"]]
    assert (block.X.toarray() == expected).all()
    assert block.X[:, [0, 2, 4]].nnz == 0


def test_symbol_only_input_takes_the_references_ensembl_keys(tmp_path):
    """A reference keyed by Ensembl ids and an input with symbols only: genes are found by
    symbol and stored under the reference's keys, so models map between them by key."""
    symbols = ["STAT1", "IRF1", "JAK2", "MYC"]
    var = pd.DataFrame({"gene_symbols": symbols}, index=E[:4])
    ref = build_store([_input(tmp_path, "ids", E[:4], 0, var=var)], tmp_path / "ids.zarr")
    order = ["MYC", "STAT1", "JAK2", "IRF1"]
    path = _input(tmp_path, "symbols", order, 3)
    out = build_store([path], tmp_path / "symbols.zarr", genes_from=ref)
    reader, block, labels = read_back(out)
    assert list(reader.meta.var.index) == E[:4]
    assert list(reader.meta.var["gene_symbol"]) == symbols
    expected = aligned_input(path, symbols, order)[labels["_source_row"]]
    assert (block.X.toarray() == expected).all()


def test_bad_sources_are_one_line(tmp_path, reference, capsys):
    path = _input(tmp_path, "x", list("ABC"), 4)
    for source, problem in ((tmp_path / "nope", "no such store or run directory"),
                            (tmp_path, "neither a store")):  # fmt: skip
        argv = ["data", "build", path, "--out", str(tmp_path / "s"), "--genes-from", str(source)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {source}: --genes-from: {problem}") and err.count("\n") == 1
        assert not (tmp_path / "s").exists()
    with pytest.raises(DataValidationError, match="alternatives"):
        build_store([path], tmp_path / "s", hvg=2, genes_from=reference)
    with pytest.raises(SystemExit):  # argparse: mutually exclusive with --genes / --hvg
        main(["data", "build", path, "--out", "s", "--genes", "g.txt", "--genes-from", reference])
