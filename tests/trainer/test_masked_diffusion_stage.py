"""``latentcell train masked-diffusion`` (and its pretraining) through the real CLI and loop on
a tiny perturbation store with a split file: the run's bins and fold changes come from the
training cells only (checked against an independent computation), the adaptive mask weights
follow the fold changes, the trained model moves the held-in perturbations' cells the way the
data does, pretraining starts fine-tuning through ``init.run`` with its bins, and bad set-ups
are one line with exit code 2."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.inference.predict import _dense
from latentcell.models.expression import log1p_normalize
from latentcell.models.expression_bins import fit_bin_edges
from latentcell.trainer.st_stage import split_source_rows
from tests.masked_diffusion_runs import train, trained_masked_diffusion

TINY = ("data.set_size=16", "data.sets_per_batch=4", "model.hidden=32", "model.depth=2",
        "model.heads=2", "model.control_depth=1", "model.n_bins=8", "model.patch_size=4")  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_masked_diffusion(tmp_path_factory.mktemp("masked_diffusion_stage"),
                                    "model.patch_size=4", steps=300)  # fmt: skip


def _training_cells(tiny):
    cells = tiny.cells[split_source_rows(tiny.run, tiny.store)["train"]]
    counts = _dense(cells.X)
    return cells, log1p_normalize(counts, counts.sum(1))


def test_the_card_and_the_statistics_come_from_the_training_cells(tiny):
    card = json.loads((tiny.run / "final" / "model_config.json").read_text())
    assert card["class"] == "latentcell.models.masked_diffusion.MaskedDiffusion"
    assert card["config"]["n_bins"] == 8 and card["set_size"] == 16
    assert not set(card["trained_perturbations"]) & set(tiny.held)
    cells, x = _training_cells(tiny)
    assert np.allclose(card["bins"]["edges"], fit_bin_edges(x, 8), atol=1e-5)
    # fold changes: an independent pandas computation of the same rule
    with np.load(tiny.run / "statistics.npz") as f:
        fold, weight = f["fold"], f["mask_weight"]
    obs = cells.obs[["target_gene", "cell_type"]].astype(str).reset_index(drop=True)
    means = pd.DataFrame(x).groupby([obs["target_gene"], obs["cell_type"]]).mean()
    sizes = obs.groupby(["target_gene", "cell_type"]).size()
    labels = card["categories"]["perturbation"]
    trained = [p for p in card["trained_perturbations"] if p != "non-targeting"]
    assert trained and not fold[labels.index("non-targeting")].any()
    for label in trained:
        parts = [(means.loc[(label, t)] - means.loc[("non-targeting", t)]) * sizes[(label, t)]
                 for t in obs["cell_type"].unique() if (label, t) in sizes]  # fmt: skip
        expect = sum(parts) / sum(sizes[(label, t)] for t in obs["cell_type"].unique()
                                  if (label, t) in sizes) / np.log(2)  # fmt: skip
        assert np.allclose(fold[labels.index(label)], expect, atol=1e-4)
        assert card["magnitude"][label] == pytest.approx(np.linalg.norm(expect), abs=1e-3)
    for label in tiny.held:
        assert not fold[labels.index(label)].any()
    response = np.abs(fold[[labels.index(p) for p in trained]]).mean(0)
    order = np.argsort(response)
    assert (np.diff(weight[order]) >= -1e-6).all() and weight.max() > 1.5 > 0.75 > weight.min()


def test_predicted_shifts_follow_the_data(tiny):
    """Each trained perturbation's predicted mean shift from the test split's controls against
    the real one on the test cells (Pearson over genes)."""
    from latentcell.inference.masked_diffusion_predictor import MaskedDiffusionPredictor

    test = tiny.cells[split_source_rows(tiny.run, tiny.store)["test"]]
    counts = _dense(test.X)
    x = log1p_normalize(counts, counts.sum(1))
    pert = test.obs["target_gene"].astype(str).to_numpy()
    control = x[pert == "non-targeting"]
    predictor = MaskedDiffusionPredictor(tiny.run, steps=8)
    scores = []
    for label in predictor.run_labels.perturbations:
        real = x[pert == label].mean(0) - control.mean(0)
        out = predictor.predict(control, label, "", rng=np.random.default_rng(0))
        scores.append(np.corrcoef(real, out.mean(0) - control.mean(0))[0, 1])
    assert min(scores) > 0.6, scores


def test_uniform_masking_is_the_ablation(tiny, tmp_path):
    run = tmp_path / "uniform"
    assert train("masked-diffusion", f"data.path={tiny.store}", f"split.file={tiny.split}",
                 f"run.dir={run}", *TINY, "masking.adaptive=0", "train.max_steps=3") == 0  # fmt: skip
    with np.load(run / "statistics.npz") as f:
        assert (f["mask_weight"] == 1).all()


def test_pretraining_on_scbasecount_starts_fine_tuning_with_its_bins(tiny, tmp_path, capsys):
    """Pretraining on an observational (scBaseCount-schema) store of 100 genes, fine-tuning on
    the perturbation store's 60 (all among them): genes mapped by key, the bins kept."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    synthesize(SynthConfig(schema="scbasecount", n_cells=600, n_genes=100, n_cell_types=2,
                           n_batches=3, seed=0), tmp_path / "obs.h5ad")  # fmt: skip
    build_store([tmp_path / "obs.h5ad"], tmp_path / "obs.zarr", schema="scbasecount")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    assert train("masked-diffusion-pretrain", f"data.path={tmp_path / 'obs.zarr'}",
                 f"run.dir={pre}", *TINY, "train.max_steps=20") == 0  # fmt: skip
    pre_card = json.loads((pre / "final" / "model_config.json").read_text())
    assert pre_card["class"].endswith("MaskedDiffusionPretrain") and len(pre_card["genes"]) == 100
    capsys.readouterr()
    assert train("masked-diffusion", f"data.path={tiny.store}", f"split.file={tiny.split}",
                 f"run.dir={ft}", f"init.run={pre}", *TINY, "train.max_steps=3") == 0  # fmt: skip
    card = json.loads((ft / "final" / "model_config.json").read_text())
    assert card["bins"]["edges"] == pre_card["bins"]["edges"]
    init = json.loads((ft / "summary.json").read_text())["init"]
    assert init["genes"]["matched"] == 60 and init["genes"]["dropped"] == 40
    assert {"gene.weight", "control_encoder.0.weight", "label.weight"} <= set(
        init["tensors"]["remapped"])  # by key  # fmt: skip
    assert init["n_tensors"]["loaded"] > 20
    fresh = set(init["tensors"]["fresh"])
    assert {"edges", "mask_weight", "magnitude", "targets"} <= fresh  # this run's own


@pytest.mark.parametrize("case", ["st_run", "other_bins", "no_perturbation"])
def test_bad_setups_are_one_line(tiny, tmp_path, capsys, case):
    from latentcell.data_pipelines.build import build_store

    store, extra = tiny.store, []
    if case == "st_run":
        st = tmp_path / "st"
        assert train("st", f"data.path={store}", f"run.dir={st}", "model.hidden=16",
                     "model.depth=1", "model.heads=1", "data.set_size=8",
                     "train.max_steps=2") == 0  # fmt: skip
        extra = [f"init.run={st}"]
    elif case == "other_bins":
        extra = [f"init.run={tiny.run}", "model.n_bins=5"]
    else:
        plain = tiny.cells.copy()
        del plain.obs["target_gene"], plain.obs["cell_type"]
        plain.write_h5ad(tmp_path / "plain.h5ad")
        store = tmp_path / "plain.zarr"
        build_store([tmp_path / "plain.h5ad"], store, schema="generic")
    capsys.readouterr()
    code = train("masked-diffusion", f"data.path={store}", f"run.dir={tmp_path / 'run'}",
                 *TINY, "train.max_steps=2", *extra)  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert {"st_run": "class", "other_bins": "init.run",
            "no_perturbation": "roles.perturbation"}[case] in err[0]  # fmt: skip
    assert not (tmp_path / "run" / "final").exists()


def test_the_run_predicts_through_the_cli(tiny, tmp_path, capsys):
    from latentcell.launch.cli import main

    controls = tiny.cells[tiny.cells.obs["target_gene"] == "non-targeting"][:60].copy()
    controls.write_h5ad(tmp_path / "ctrl.h5ad")
    card = json.loads((tiny.run / "final" / "model_config.json").read_text())
    label = [x for x in card["trained_perturbations"] if x != "non-targeting"][0]
    base = ["predict", "--run", str(tiny.run), "--controls", str(tmp_path / "ctrl.h5ad"),
            "--cells-per-perturbation", "30"]  # fmt: skip
    out = tmp_path / "pred.h5ad"
    assert main([*base, "--perturbations", label, "--steps", "4", "--guidance", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    pred = ad.read_h5ad(out)
    assert pred.n_obs == 60 + 30 * controls.obs["cell_type"].nunique()
    assert pred.uns["latentcell"]["predictor"] == "masked-diffusion"
    for extra in (["--perturbations", tiny.held[0]], ["--perturbations", label, "--mode", "b"],
                  ["--perturbations", label, "--steps", "0"]):  # fmt: skip
        capsys.readouterr()
        bad = tmp_path / "bad.h5ad"
        assert main([*base, *extra, "--out", str(bad)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not bad.exists()
