"""``latentcell predict`` as a user runs it, through ``latentcell.launch.cli.main``, on a tiny
zero-shot ST run (one perturbation held out whole) trained with ``model.target_effect`` and
``model.perturbation_dropout``: every trained perturbation (``all``), the held-out one refused
by default and predicted with ``--unseen generic``, and a baseline with ``--target-effect``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest

from latentcell.launch.cli import main
from latentcell.trainer.st_stage import split_source_rows


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def zero_shot(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli")
    split = root / "split.toml"
    split.write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n"
        "[split.perturbations]\nn_test = 1\n"
    )
    run = root / "st"
    argv = ["train", "st"]
    for item in (
        f"data.path={small_store}", f"split.file={split}", f"run.dir={run}",
        "data.set_size=16", "data.sets_per_batch=4", "model.hidden=32", "model.depth=1",
        "model.heads=2", "model.target_effect=true", "model.perturbation_dropout=0.5",
        "train.max_steps=6", "train.eval_every=0", "train.checkpoint_every=0",
        "train.progress=false", "tracking.enabled=false",
    ):  # fmt: skip
        argv += ["--set", item]
    try:
        assert main(argv) == 0
    finally:
        _reset_accelerate()
    source = ad.read_h5ad(small_store.parent / "cells.h5ad")
    rows = split_source_rows(run, small_store)
    test, train = root / "test.h5ad", root / "train.h5ad"
    source[rows["test"]].write_h5ad(test)
    source[rows["train"]].write_h5ad(train)
    held = json.loads((run / "split.json").read_text())["held_out"]["test_perturbations"]
    return SimpleNamespace(root=root, run=run, test=test, train=train, held=held[0])


def _predict(z, out, *extra: str) -> int:
    return main(["predict", "--controls", str(z.test), "--cells-per-perturbation", "20",
                 "--out", str(out), *extra])  # fmt: skip


def test_all_predicts_every_trained_perturbation_and_refuses_the_held_out_one(zero_shot, capsys):
    z = zero_shot
    out = z.root / "all.h5ad"
    assert _predict(z, out, "--run", str(z.run), "--perturbations", "all") == 0
    pred = ad.read_h5ad(out)
    card = json.loads((z.run / "final" / "model_config.json").read_text())
    trained = sorted(set(card["trained_perturbations"]) - {"non-targeting"})
    assert z.held not in trained and len(trained) >= 2
    predicted = pred.obs.loc[pred.obs.source == "st", "target_gene"].astype(str)
    assert sorted(set(predicted)) == trained
    assert (predicted.value_counts() == 20 * pred.obs.cell_type.nunique()).all()

    refused = z.root / "refused.h5ad"
    assert _predict(z, refused, "--run", str(z.run), "--perturbations", z.held) == 2
    assert "--unseen generic" in capsys.readouterr().err
    assert not refused.exists()


def test_unseen_generic_predicts_the_held_out_target(zero_shot):
    z = zero_shot
    out = z.root / "generic.h5ad"
    argv = ("--run", str(z.run), "--perturbations", z.held, "--unseen", "generic")
    assert _predict(z, out, *argv) == 0
    pred = ad.read_h5ad(out)
    assert (pred.obs.target_gene.astype(str) == z.held).sum() == 20 * pred.obs.cell_type.nunique()


def test_baseline_with_target_effect_knocks_the_target_down(zero_shot):
    z = zero_shot
    plain, knocked = z.root / "mean.h5ad", z.root / "mean_target.h5ad"
    common = ("--baseline", "mean", "--train", str(z.train), "--perturbations", z.held)
    assert _predict(z, plain, *common) == 0
    assert _predict(z, knocked, *common, "--target-effect") == 0
    a, b = ad.read_h5ad(plain), ad.read_h5ad(knocked)
    assert b.uns["latentcell"]["predictor"] == "mean+target"
    column = list(a.var_names).index(z.held)  # synthetic targets are measured genes
    rows = (a.obs.target_gene.astype(str) == z.held).to_numpy()

    def expression(x):
        return np.asarray(x.X[rows][:, column].sum())

    assert expression(b) < 0.8 * expression(a)  # the training targets show a knockdown


def test_controls_named_by_symbols_or_ids_predict_the_same_cells(zero_shot):
    """``inference/gene_names.py``: the file keeps the controls' gene names and order, with
    the store's ``gene_id`` and ``gene_symbol`` beside them; controls named by symbols only
    or by Ensembl ids (in another order) predict the same cells."""
    z = zero_shot
    card = json.loads((z.run / "final" / "model_config.json").read_text())
    source = ad.read_h5ad(z.test)  # the VCC shape: symbols as var_names, a gene_id column
    symbols = source.copy()
    del symbols.var["gene_id"]
    ids = source[:, ::-1].copy()
    ids.var_names = ids.var["gene_id"].astype(str).to_numpy()
    del ids.var["gene_id"]
    written = {}
    for name, adata in (("source", source), ("symbols", symbols), ("ids", ids)):
        adata.write_h5ad(z.root / f"{name}_controls.h5ad")
        out = z.root / f"{name}_pred.h5ad"
        argv = ["predict", "--run", str(z.run), "--perturbations", "all", "--controls",
                str(z.root / f"{name}_controls.h5ad"), "--cells-per-perturbation", "5",
                "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        written[name] = ad.read_h5ad(out)
    assert list(written["symbols"].var_names) == list(source.var_names)
    assert list(written["ids"].var_names) == list(ids.var_names)
    for pred in written.values():
        by_id = dict(zip(card["genes"], card["gene_symbols"], strict=True))
        assert [by_id[g] for g in pred.var["gene_id"]] == list(pred.var["gene_symbol"])
    x = written["source"].X.toarray()
    np.testing.assert_array_equal(written["symbols"].X.toarray(), x)
    np.testing.assert_array_equal(written["ids"].X.toarray(), x[:, ::-1])
