"""Gene keys, the cross-input conflict rule, union/intersection/list vocabularies, the aligner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.schemas import get_schema
from latentcell.data_pipelines.vocabulary import (
    build_vocabulary,
    input_genes,
    looks_like_ensembl,
    make_aligner,
    read_gene_list,
    resolve_keys,
    strip_version,
    vocabulary_from_list,
)

AUTO = get_schema("auto")
E1, E2, E3, E4 = (f"ENSG{i:011d}" for i in (1, 2, 3, 4))


def _symbols(*names):
    return input_genes(pd.DataFrame(index=list(names)), AUTO, "sym.h5ad")


def _with_ids(symbols, ids, path="ids.h5ad"):
    var = pd.DataFrame({"gene_id": ids}, index=symbols)
    return input_genes(var, get_schema("vcc"), path)


def test_ensembl_detection_and_versions():
    assert list(looks_like_ensembl(["ENSG00000141510", "ENSMUSG00000059552.3", "TP53"])) == [
        True,
        True,
        False,
    ]
    assert strip_version("ENSG00000141510.16") == "ENSG00000141510"
    assert strip_version("MT-CO1.2") == "MT-CO1.2"


def test_keys_prefer_ids():
    vcc = _with_ids(["A", "B"], [E1 + ".7", E2])
    assert list(vcc.keys) == [E1, E2] and list(vcc.ids) == [E1 + ".7", E2]
    sc = input_genes(
        pd.DataFrame({"gene_symbols": ["A", "B"]}, index=[E1, E2]),
        get_schema("scbasecount"),
        "sc.h5ad",
    )
    assert list(sc.keys) == [E1, E2] and list(sc.symbols) == ["A", "B"]
    auto = input_genes(pd.DataFrame(index=[E1, E2, "ERCC-1"]), AUTO, "a.h5ad")
    assert list(auto.keys) == [E1, E2, "ERCC-1"] and list(auto.ids) == [E1, E2, ""]
    assert list(_symbols("A", "B").keys) == ["A", "B"]


def test_duplicate_symbols_with_distinct_ids_are_fine():
    table = _with_ids(["A", "A"], [E1, E2])
    assert list(table.keys) == [E1, E2]
    with pytest.raises(DataValidationError, match="duplicate gene names"):
        _with_ids(["A", "B"], [E1, E1])


def test_symbol_only_inputs_join_id_inputs():
    ids = _with_ids(["A", "B"], [E1, E2])
    sym = _symbols("B", "C")
    keys = resolve_keys([ids, sym], ["ids.h5ad", "sym.h5ad"])
    assert list(keys[1]) == [E2, "C"]
    vocab = build_vocabulary([ids, sym], keys, "union")
    assert list(vocab.keys) == [E1, E2, "C"]
    assert list(vocab.var["gene_symbol"]) == ["A", "B", "C"]
    assert list(vocab.var["gene_id"]) == [E1, E2, ""]
    assert vocab.var.index.name == "gene_key"


def test_symbol_only_gene_matching_two_ids_is_ambiguous():
    ids = _with_ids(["A", "A"], [E1, E2])
    with pytest.raises(DataValidationError, match="several ids"):
        resolve_keys([ids, _symbols("A")], ["ids.h5ad", "sym.h5ad"])


def test_conflict_rule_disjoint_id_sets():
    a = _with_ids(["A", "B"], [E1, E2], "a.h5ad")
    b = _with_ids(["A", "B"], [E3, E2], "b.h5ad")
    with pytest.raises(DataValidationError) as err:
        resolve_keys([a, b], ["a.h5ad", "b.h5ad"])
    assert err.value.path == "b.h5ad" and "'A'" in err.value.problem
    assert "a.h5ad" in err.value.problem


def test_overlapping_id_sets_and_renamed_symbols_are_not_conflicts():
    both = _with_ids(["A", "A", "B"], [E1, E2, E3], "a.h5ad")
    one = _with_ids(["A", "B2"], [E2, E3], "b.h5ad")  # E3 renamed B -> B2
    keys = resolve_keys([both, one], ["a.h5ad", "b.h5ad"])
    vocab = build_vocabulary([both, one], keys)
    assert list(vocab.keys) == [E1, E2, E3]
    assert vocab.var.loc[E3, "gene_symbol"] == "B"  # first seen wins


def test_union_and_intersection_orders():
    a, b = _symbols("C", "A", "B"), _symbols("D", "B", "C")
    keys = resolve_keys([a, b], ["a", "b"])
    assert list(build_vocabulary([a, b], keys, "union").keys) == ["C", "A", "B", "D"]
    assert list(build_vocabulary([a, b], keys, "intersection").keys) == ["C", "B"]
    with pytest.raises(ValueError):
        build_vocabulary([a, b], keys, "outer")


def test_gene_list(tmp_path):
    ids = _with_ids(["A", "B", "C"], [E1, E2, E3])
    vocab = build_vocabulary([ids], resolve_keys([ids], ["ids.h5ad"]))
    path = tmp_path / "genes.txt"
    path.write_text(f"# my genes\nC\n{E1}.4\n\nZZZ\n{E4}\n")
    names = read_gene_list(str(path))
    assert names == ["C", f"{E1}.4", "ZZZ", E4]
    with pytest.warns(UserWarning, match="2 listed genes occur in no input"):
        listed = vocabulary_from_list(vocab, names, str(path))
    assert list(listed.keys) == [E3, E1, "ZZZ", E4]
    assert list(listed.var["gene_symbol"]) == ["C", "A", "ZZZ", ""]
    assert list(listed.var["gene_id"]) == [E3, E1, "", E4]


def test_gene_list_errors(tmp_path):
    dup = _with_ids(["A", "A"], [E1, E2])
    vocab = build_vocabulary([dup], resolve_keys([dup], ["d"]))
    with pytest.raises(DataValidationError, match="names several genes"):
        vocabulary_from_list(vocab, ["A"], "genes.txt")
    path = tmp_path / "g.txt"
    path.write_text("A\nB\nA\n")
    with pytest.raises(DataValidationError, match="listed twice"):
        read_gene_list(str(path))
    with pytest.raises(DataValidationError, match="not found"):
        read_gene_list(str(tmp_path / "missing.txt"))


def test_aligner_matches_dense_reindexing():
    rng = np.random.default_rng(0)
    X = sp.random(30, 6, density=0.5, format="csr", random_state=1, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    input_keys = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    store = pd.Index(["x", "e", "a", "y", "c"])  # drops b, d, f; x, y absent (zero-filled)
    out = make_aligner(input_keys, store)(X)
    dense = X.toarray()
    expected = np.zeros((30, 5), dtype=np.float32)
    for j, key in enumerate(store):
        if key in input_keys:
            expected[:, j] = dense[:, list(input_keys).index(key)]
    np.testing.assert_array_equal(out.toarray(), expected)
    assert out.has_sorted_indices and out.data.dtype == np.float32
    assert out.indices.dtype == np.int32
    perm = rng.permutation(6)
    back = make_aligner(input_keys[perm], pd.Index(input_keys))(X)
    np.testing.assert_array_equal(back.toarray()[:, perm], dense)


def test_identity_aligner_converts_dtype():
    X = sp.csr_matrix(np.array([[1, 0], [0, 3]], dtype=np.int64))
    aligner = make_aligner(np.array(["a", "b"], dtype=object), pd.Index(["a", "b"]))
    assert aligner.is_identity
    out = aligner(X)
    assert out.dtype == np.float32 and (out.toarray() == X.toarray()).all()
