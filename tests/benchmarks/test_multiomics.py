"""``latentcell benchmark multiomics`` end to end on a tiny synthetic CITE-seq file (two folds,
a few training steps): results.json and results.md written, the table recomputed from the
folds, every protein scored for both entries, the totalVI status said, bad flags one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentcell.launch.cli import main
from tests.multiomics_data import synthetic_cite


@pytest.fixture(scope="module")
def cite(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiomics_bench")
    synthetic_cite(n_cells=160, n_genes=50, n_proteins=6, seed=2).adata.write_h5ad(root / "c.h5ad")
    return root / "c.h5ad"


def test_results_are_written_and_add_up(cite, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "multiomics", "--data", str(cite), "--out", str(out), "--folds", "2",
            "--steps", "40", "--set", "data.n_top_genes=30", "--set", "model.n_hidden=32"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    text = (out / "results.md").read_text()
    assert "| multiomics |" in text and "| ridge |" in text and "totalVI" in text
    assert results["totalvi"]["status"] in ("not installed", "installed, not run")
    folds = results["folds"]
    assert [f["n_test"] for f in folds] == [80, 80] and all(f["n_genes"] == 30 for f in folds)
    for entry in ("multiomics", "ridge"):
        values = [f["scores"][entry]["rna_to_protein"]["mean"] for f in folds]
        assert results["table"][entry]["rna_to_protein"]["mean"] == pytest.approx(np.mean(values))
        assert results["table"][entry]["rna_to_protein"]["sd"] == pytest.approx(
            np.std(values, ddof=1))  # fmt: skip
    assert len(results["per_protein"]) == 6
    assert results["table"]["ridge"]["rna_to_protein"]["mean"] > 0.5  # a known dependence
    assert "multiomics - ridge (paired)" in results["table"]


def test_bad_flags_are_one_line(cite, tmp_path, capsys):
    argv = ["benchmark", "multiomics", "--data", str(cite), "--out", str(tmp_path / "b"),
            "--folds", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--folds" in err and err.count("\n") == 0
    assert not (tmp_path / "b").exists()
