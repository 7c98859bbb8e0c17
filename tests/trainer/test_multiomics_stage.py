"""``latentcell train multiomics`` through the shared loop: the cells it reads (validation cells
held out, genes chosen on training cells only), the card translation works from, a resume on
the very same cells, and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from latentcell.launch.cli import main
from latentcell.trainer.multiomics_stage import select_genes
from tests.cvae_runs import QUIET, reset_accelerate
from tests.multiomics_data import synthetic_cite


@pytest.fixture(scope="module")
def cite(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiomics_stage")
    data = synthetic_cite(n_cells=200, n_genes=60, n_proteins=8)
    data.adata.write_h5ad(root / "cells.h5ad")
    return root, data


def _train(capsys, *items: str) -> tuple[int, str]:
    argv = ["train", "multiomics"]
    for item in (*QUIET, "model.n_hidden=16", *items):
        argv += ["--set", item]
    try:
        code = main(argv)
    finally:
        reset_accelerate()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return code, "\n".join(err)


def test_cells_genes_and_card(cite, tmp_path, capsys):
    root, data = cite
    run = tmp_path / "run"
    code, _ = _train(capsys, f"data.path={root / 'cells.h5ad'}", f"run.dir={run}",
                     "data.n_top_genes=25", "data.val_fraction=0.2", "train.max_steps=3")  # fmt: skip
    assert code == 0
    with np.load(run / "cells.npz") as f:
        train, val, genes = f["train_rows"], f["val_rows"], list(f["genes"])
        train_rna = f["train_rna"]
    assert len(val) == 40 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(200))
    counts = data.adata.X.tocsr()
    chosen = select_genes(counts[train], 25)  # the training cells' HVGs, in file order
    assert genes == [f"g{i}" for i in chosen] and len(genes) == 25
    np.testing.assert_array_equal(train_rna, counts[train][:, chosen].toarray())
    card = json.loads((run / "final" / "model_config.json").read_text())
    assert card["class"] == "latentcell.models.multiomics.MultiomicsVAE"
    assert card["genes"] == genes and card["proteins"] == [f"CD{i}" for i in range(8)]
    protein = data.adata.obsm["protein_counts"].to_numpy()[train]
    assert card["protein_library"] == pytest.approx(np.median(protein.sum(1)))
    assert card["config"]["n_genes"] == 25 and card["data"]["n_val"] == 40


def test_a_resumed_run_continues_on_the_same_cells(cite, tmp_path, capsys):
    root, _ = cite
    run = tmp_path / "run"
    common = (f"data.path={root / 'cells.h5ad'}", f"run.dir={run}", "data.n_top_genes=20")
    assert _train(capsys, *common, "train.max_steps=4")[0] == 0
    written = (run / "cells.npz").stat().st_mtime_ns
    argv = ["train", "multiomics", "--resume", "auto"]
    for item in (*QUIET, "model.n_hidden=16", *common, "train.max_steps=6"):
        argv += ["--set", item]
    try:
        assert main(argv) == 0
    finally:
        reset_accelerate()
    assert "resumed from" in capsys.readouterr().err
    assert (run / "cells.npz").stat().st_mtime_ns == written  # reused, not rewritten
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def _edited(root, name: str, edit) -> str:
    """A copy of the good file with ``edit(adata)`` applied."""
    _, data = root
    adata = data.adata.copy()
    edit(adata)
    path = root[0] / f"{name}.h5ad"
    adata.write_h5ad(path)
    return str(path)


def _set_x(adata, value):
    adata.X = adata.X.astype(np.float32)
    adata.X.data[3] = value


def _set_protein(adata, value):
    adata.obsm["protein_counts"].iloc[2, 1] = value


BAD = {
    "no_protein": (lambda a: a.obsm.pop("protein_counts"), "obsm['protein_counts']", "missing"),
    "fractional_rna": (lambda a: _set_x(a, 1.5), "X", "non-integer"),
    "negative_rna": (lambda a: _set_x(a, -2.0), "X", "negative"),
    "negative_protein": (lambda a: _set_protein(a, -1.0), "obsm['protein_counts']", "negative"),
    "nan_protein": (lambda a: _set_protein(a, np.nan), "obsm['protein_counts']", "NaN"),
    "too_few": (None, "cells", "fewer than"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line(cite, tmp_path, capsys, name):
    edit, field, problem = BAD[name]
    if name == "too_few":
        path = tmp_path / "few.h5ad"
        cite[1].adata[:6].copy().write_h5ad(path)
    else:
        path = _edited(cite, name, edit)
    run = tmp_path / "run"
    code, err = _train(capsys, f"data.path={path}", f"run.dir={run}")
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert str(path) in err and field in err and problem in err, err
    assert not run.exists()  # nothing written


def test_protein_rows_that_do_not_match_the_cells_are_one_line(cite, tmp_path, capsys):
    """A file whose protein matrix lost rows (edited outside anndata)."""
    path = tmp_path / "short.h5ad"
    adata = cite[1].adata.copy()
    adata.obsm["protein_counts"] = adata.obsm["protein_counts"].to_numpy()
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        values = f["obsm/protein_counts"][:-5]
        del f["obsm/protein_counts"]
        f["obsm/protein_counts"] = values
    run = tmp_path / "run"
    code, err = _train(capsys, f"data.path={path}", f"run.dir={run}")
    assert code == 2 and err.count("\n") == 0 and str(path) in err, err
    assert not run.exists()


def test_no_input_file_is_one_line(tmp_path, capsys):
    code, err = _train(capsys, f"run.dir={tmp_path / 'run'}")
    assert code == 2 and "data.path" in err and "--set data.path=" in err
