"""``latentcell predict --run RUN --cells F --to protein|rna`` as a user runs it: a multiomics run
trained through the CLI translates held-out synthetic cells both ways (close to the known
truth, far from a shuffled baseline), the file is written whole, and flags that make no sense
are one line (exit 2) on either side of ``predict``."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from latentcell.launch.cli import main
from tests.multiomics_data import column_pearson, trained_multiomics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_multiomics(tmp_path_factory.mktemp("translate_cli"))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = "\n".join(line for line in captured.err.splitlines() if not line.startswith("warning:"))
    return code, captured.out, err


def _log1p(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


def test_rna_to_protein_writes_predicted_counts_beside_the_measured(tiny, tmp_path, capsys):
    out = tmp_path / "protein.h5ad"
    code, stdout, _ = _cli(capsys, "predict", "--run", tiny.run, "--cells", tiny.test,
                           "--to", "protein", "--out", out)  # fmt: skip
    assert code == 0 and "predicted protein features (obsm['protein_counts'])" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["protein.h5ad"]  # no temporary left
    pred, source = ad.read_h5ad(out), ad.read_h5ad(tiny.test)
    assert list(pred.obsm["protein_counts"].columns) == [f"CD{i}" for i in range(12)]
    np.testing.assert_array_equal(pred.obsm["protein_counts_measured"].to_numpy(),
                                  source.obsm["protein_counts"].to_numpy())  # fmt: skip
    card = json.loads((tiny.run / "final" / "model_config.json").read_text())
    counts = pred.obsm["protein_counts"].to_numpy()
    np.testing.assert_allclose(counts.sum(1), card["protein_library"], rtol=1e-4)
    r = column_pearson(_log1p(counts), tiny.truth["protein"]).mean()
    shuffled = column_pearson(_log1p(counts)[::-1], tiny.truth["protein"]).mean()
    assert r > 0.85 and abs(shuffled) < 0.3, (r, shuffled)
    assert pred.uns["latentcell"]["translated"] == "rna -> protein"


def test_protein_to_rna_writes_the_runs_genes(tiny, tmp_path, capsys):
    out = tmp_path / "rna.h5ad"
    code, stdout, _ = _cli(capsys, "predict", "--run", tiny.run, "--cells", tiny.test, "--to",
                           "rna", "--out", out, "--json")  # fmt: skip
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["to"] == "rna" and summary["n_cells"] == 100 and summary["field"] == "X"
    pred = ad.read_h5ad(out)
    assert list(pred.var_names) == [f"g{i}" for i in range(80)]  # data.n_top_genes=0: all
    assert list(pred.obs_names) == list(ad.read_h5ad(tiny.test).obs_names)
    r = column_pearson(_log1p(pred.X), tiny.truth["rna"]).mean()
    shuffled = column_pearson(_log1p(pred.X)[::-1], tiny.truth["rna"]).mean()
    assert r > 0.85 and abs(shuffled) < 0.3, (r, shuffled)


def _renamed_proteins(tiny, tmp_path):
    cells = ad.read_h5ad(tiny.test)
    cells.obsm["protein_counts"] = cells.obsm["protein_counts"].rename(columns={"CD3": "CD3e"})
    cells.write_h5ad(tmp_path / "renamed.h5ad")
    return tmp_path / "renamed.h5ad"


def _genes_dropped(tiny, tmp_path):
    cells = ad.read_h5ad(tiny.test)[:, 5:].copy()
    cells.write_h5ad(tmp_path / "dropped.h5ad")
    return tmp_path / "dropped.h5ad"


def _fake_cvae_run(tiny, tmp_path):
    run = tmp_path / "cvae_run"
    (run / "final").mkdir(parents=True)
    card = {"class": "latentcell.models.cvae.ConditionalVAE", "config": {}}
    (run / "final" / "model_config.json").write_text(json.dumps(card))
    return run


CASES = {
    "perturbation flag with --to": (
        lambda t, p: ["--run", t.run, "--cells", t.test, "--to", "rna", "--controls", t.test],
        ["--controls", "translation"]),
    "seed with --to": (lambda t, p: ["--run", t.run, "--cells", t.test, "--to", "rna",
                                     "--seed", "3"], ["--seed"]),
    "no --cells": (lambda t, p: ["--run", t.run, "--to", "protein"], ["--cells"]),
    "--cells without --to": (lambda t, p: ["--run", t.run, "--cells", t.test], ["--cells", "--to"]),
    "multiomics run predicting perturbations": (
        lambda t, p: ["--run", t.run, "--controls", t.test, "--perturbations", "all",
                      "--cells-per-perturbation", "5"], ["translates", "--to protein|rna"]),
    "a run that does not translate": (
        lambda t, p: ["--run", _fake_cvae_run(t, p), "--cells", t.test, "--to", "rna"],
        ["does not translate"]),
    "missing proteins": (
        lambda t, p: ["--run", t.run, "--cells", _renamed_proteins(t, p), "--to", "rna"],
        ["obsm['protein_counts']", "CD3"]),
    "missing genes": (
        lambda t, p: ["--run", t.run, "--cells", _genes_dropped(t, p), "--to", "protein"],
        ["dropped.h5ad", "g0"]),
    "perturbation path without --controls": (
        lambda t, p: ["--baseline", "mean", "--perturbations", "all",
                      "--cells-per-perturbation", "5"], ["--controls", "required"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_flags_that_make_no_sense_are_one_line(tiny, tmp_path, capsys, case):
    argv, named = CASES[case]
    out = tmp_path / "out.h5ad"
    code, _, err = _cli(capsys, "predict", *argv(tiny, tmp_path), "--out", out)
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    for text in named:
        assert text in err, (text, err)
    assert not out.exists()
