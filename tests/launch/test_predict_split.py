"""``latentcell predict --baseline --split S.toml --store STORE`` through the real CLI, on a
store whose columns are NOT the VCC names: the baseline is fitted on the split's training
cells only (checked against a baseline fitted here on those cells, cut from the input file),
with the column options defaulting to the store's roles; ``--train`` of a ``data split`` file
defaults to the roles it records; misuse is one line."""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.perturbation_splits import assign_split
from latentcell.data_pipelines.synth import SynthConfig, synthesize
from latentcell.evaluation.perturbation_baselines import fit_baseline
from latentcell.inference.predict import PopulationRequest, predict_population
from latentcell.launch.cli import main

NAMES = {"target_gene": "knockdown", "cell_type": "line", "batch": "lane"}
CONTROL = "NT"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_split")
    vcc = root / "vcc.h5ad"
    synthesize(
        SynthConfig(n_cells=600, n_genes=60, n_perturbations=3, n_cell_types=2, n_batches=2,
                    seed=4),
        vcc,
    )  # fmt: skip
    cells = ad.read_h5ad(vcc)
    cells.obs = cells.obs.rename(columns=NAMES).drop(columns=["guide_id"])
    knockdown = cells.obs["knockdown"].astype(str)
    cells.obs["knockdown"] = knockdown.where(knockdown != "non-targeting", CONTROL)
    source = root / "cells.h5ad"
    cells.write_h5ad(source)
    store = root / "cells.zarr"
    build_store([source], store, schema="generic", pert_col="knockdown", control=CONTROL,
                cell_type_col="line", batch_col="lane", chunk_cells=100)  # fmt: skip
    types = sorted(set(cells.obs["line"].astype(str)))
    perts = sorted(set(cells.obs["knockdown"].astype(str)) - {CONTROL})
    split = root / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n"
        f'[[split.perturbations]]\ntest = ["{perts[0]}"]\ncell_types = ["{types[0]}"]\n'
    )
    parts = root / "parts"
    assert main(["data", "split", "--store", str(store), "--split", str(split),
                 "--out", str(parts)]) == 0  # fmt: skip
    return SimpleNamespace(root=root, source=source, store=store, split=split, parts=parts)


def _predict(data, out, *extra: str) -> int:
    return main(["predict", "--baseline", "additive", "--controls",
                 str(data.parts / "test_controls.h5ad"), "--perturbations", "all",
                 "--cells-per-perturbation", "15", "--seed", "2", "--out", str(out), *extra])  # fmt: skip


def _by_hand(data, rows: np.ndarray) -> ad.AnnData:
    """``additive`` fitted here on the input cells of store ``rows`` (``_source_row``), its
    shifts matched within (cell type, batch) by the store's role columns."""
    from latentcell.data_pipelines.stores import open_store

    reader = open_store(data.store)
    source_row = reader.read_rows(0, reader.meta.n_cells).numeric["_source_row"]
    cells = ad.read_h5ad(data.source)
    train = cells[np.sort(source_row[rows])].copy()
    controls = ad.read_h5ad(data.parts / "test_controls.h5ad")
    baseline = fit_baseline("additive", train, [str(g) for g in controls.var_names],
                            "knockdown", CONTROL, "line", batch_col="lane")  # fmt: skip
    labels = sorted(set(train.obs["knockdown"].astype(str)) - {CONTROL})
    request = PopulationRequest(tuple(labels), 15, "knockdown", CONTROL, "line", seed=2)
    return predict_population(baseline, controls, request, "controls")


def test_split_fits_on_the_training_cells_with_the_store_roles(data):
    out = data.root / "split_pred.h5ad"
    assert _predict(data, out, "--split", str(data.split), "--store", str(data.store)) == 0
    pred = ad.read_h5ad(out)
    assert {"knockdown", "line"} <= set(pred.obs.columns)  # the store's names, not target_gene
    assert (pred.obs.loc[pred.obs.source == "control", "knockdown"] == CONTROL).all()

    split = assign_split(data.store, data.split)
    expected = _by_hand(data, split.train)
    assert np.array_equal(pred.X.toarray(), expected.X.toarray())
    everything = _by_hand(data, np.arange(600))  # with the test cells, another fit
    assert not np.array_equal(pred.X.toarray(), everything.X.toarray())


def test_train_file_of_data_split_gives_the_same_prediction(data):
    by_split, by_file = data.root / "a.h5ad", data.root / "b.h5ad"
    assert _predict(data, by_split, "--split", str(data.split), "--store", str(data.store)) == 0
    assert _predict(data, by_file, "--train", str(data.parts / "train.h5ad")) == 0  # roles: .uns
    a, b = ad.read_h5ad(by_split), ad.read_h5ad(by_file)
    assert np.array_equal(a.X.toarray(), b.X.toarray())
    assert a.obs.astype(str).equals(b.obs.astype(str))


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--split", "{split}", "--train", "{train}"], "--train/--split"),
        (["--split", "{split}"], "--store"),
        (["--store", "{store}"], "--store"),
        ([], "--train"),
        (["--split", "{bad}", "--store", "{store}"], "bad.toml"),
        (["--split", "{split}", "--store", "{parts}"], "parts"),
    ],
    ids=["both", "no_store", "store_alone", "no_training_cells", "bad_split", "not_a_store"],
)
def test_misuse_is_one_line(data, capsys, extra, named):
    bad = data.root / "bad.toml"
    bad.write_text("[split]\n[split.cells]\ntest_fraction = 1.5\n")
    paths = {"split": data.split, "train": data.parts / "train.h5ad", "store": data.store,
             "bad": bad, "parts": data.parts}  # fmt: skip
    out = data.root / "never.h5ad"
    code = _predict(data, out, *[a.format(**paths) for a in extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert named in err and "Fix:" in err
    assert not out.exists()


def test_a_run_refuses_a_split(data, capsys):
    code = main(["predict", "--run", str(data.root / "st"), "--split", str(data.split),
                 "--store", str(data.store), "--controls", str(data.parts / "test.h5ad"),
                 "--perturbations", "all", "--cells-per-perturbation", "5",
                 "--out", str(data.root / "x.h5ad")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--split/--store" in err and err.count("\n") == 0
