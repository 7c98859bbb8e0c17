"""``latentcell train latent-delta`` through the real CLI and loop on a tiny perturbation store
with a split file and a count VAE: the card holds what prediction and export read, the pairs
come from the split's rows and are reused when nothing they depend on changed, the trained
model moves the held-in perturbations' cells the way the data does, and bad set-ups are one
line with exit code 2."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.stores import open_store
from latentcell.models.expression import log1p_normalize
from latentcell.trainer.st_stage import split_source_rows
from tests.latent_delta_runs import train, trained_latent_delta


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_latent_delta(tmp_path_factory.mktemp("latent_delta_stage"))


def test_the_card_holds_what_prediction_and_export_need(tiny):
    card = json.loads((tiny.run / "final" / "model_config.json").read_text())
    meta = open_store(tiny.store).meta
    labels = meta.categories[meta.roles["perturbation"]]
    assert card["class"] == "latentcell.models.latent_delta.LatentDelta"
    assert card["config"]["target"] == "delta" and card["config"]["n_latent"] == 8
    assert card["config"]["n_perturbations"] == len(labels)
    assert card["genes"] == [str(g) for g in meta.var.index]
    assert card["control_label"] == "non-targeting"
    assert card["trained_perturbations"] == [x for x in labels
                                             if x not in tiny.held and x != "non-targeting"]  # fmt: skip
    assert card["vae"]["vae_run"] == str(tiny.vae.absolute())
    assert card["pairing"]["rule"] == "ot" and card["pairing"]["train_pairs"] > 0
    summary = json.loads((tiny.run / "summary.json").read_text())
    assert summary["step"] == 300 and np.isfinite(summary["val"]["val/predictor_mse"])


def test_pairs_come_from_the_splits_rows_and_are_reused(tiny):
    from latentcell.inference.vae_bridge import VAEBridge

    rows = split_source_rows(tiny.run, tiny.store)  # rows of the input file
    with np.load(tiny.run / "pairs.npz") as f:
        pairs = {k: f[k] for k in f.files}
    # every training pair's perturbed latent is a training cell's own latent
    bridge = VAEBridge(tiny.vae)
    cells = tiny.cells[rows["train"]]
    counts = np.asarray(cells.X.toarray() if hasattr(cells.X, "toarray") else cells.X, np.float32)
    z_train = bridge.encode_numpy(log1p_normalize(counts, counts.sum(1)))
    distance = np.abs(pairs["train_z_perturbed"][:, None] - z_train[None]).max(-1).min(1)
    assert distance.max() < 1e-4
    # held-out perturbations never appear among training pairs
    meta = open_store(tiny.store).meta
    labels = meta.categories[meta.roles["perturbation"]]
    assert not {labels[c] for c in pairs["train_perturbation"]} & set(tiny.held)
    # an OT pairing takes each perturbed cell once
    assert len(np.unique(pairs["train_z_perturbed"], axis=0)) == len(pairs["train_z_perturbed"])
    stamp = (tiny.run / "pairs.npz").stat().st_mtime_ns
    from latentcell.trainer.config import load_config
    from latentcell.trainer.latent_delta_stage import LatentDeltaRunConfig, LatentDeltaStage

    config = load_config(LatentDeltaRunConfig, tiny.run / "config.toml", [])
    LatentDeltaStage(config).prepare_data(True)
    assert (tiny.run / "pairs.npz").stat().st_mtime_ns == stamp  # same pairs, not rebuilt


def test_deterministic_shifts_follow_the_data(tiny):
    """The predicted mean shift of each trained perturbation, from the test split's controls,
    against the real one on the test cells (Pearson over genes)."""
    from latentcell.inference.latent_delta_predictor import LatentDeltaPredictor
    from latentcell.inference.predict import _dense

    test = tiny.cells[split_source_rows(tiny.run, tiny.store)["test"]]
    counts = _dense(test.X)
    x = log1p_normalize(counts, counts.sum(1))
    pert = test.obs["target_gene"].astype(str).to_numpy()
    control = x[pert == "non-targeting"]
    predictor = LatentDeltaPredictor(tiny.run, "deterministic")
    scores = []
    for label in predictor.run_labels.perturbations:
        real = x[pert == label].mean(0) - control.mean(0)
        predicted = predictor.predict(control, label, "").mean(0) - predictor.bridge.decode_numpy(
            predictor.bridge.encode_numpy(control)).mean(0)  # fmt: skip
        scores.append(np.corrcoef(real, predicted)[0, 1])
    assert min(scores) > 0.8, scores


def test_the_absolute_variant_trains(tiny, tmp_path):
    run = tmp_path / "absolute"
    assert train("latent-delta", f"data.path={tiny.store}", f"split.file={tiny.split}",
                 f"run.dir={run}", f"vae.run={tiny.vae}", "model.target=absolute",
                 "model.pairing=random", "model.hidden=16", "model.depth=1", "model.heads=1",
                 "data.batch_size=64", "train.max_steps=5") == 0  # fmt: skip
    card = json.loads((run / "final" / "model_config.json").read_text())
    assert card["config"]["target"] == "absolute" and card["pairing"]["rule"] == "random"


@pytest.mark.parametrize("case", ["no_vae", "no_perturbation"])
def test_bad_setups_are_one_line(tiny, tmp_path, capsys, case):
    from latentcell.data_pipelines.build import build_store

    store = tiny.store
    extra = [f"vae.run={tiny.vae}"]
    if case == "no_vae":
        extra = []
    else:
        plain = tiny.cells.copy()
        del plain.obs["target_gene"], plain.obs["cell_type"]
        plain.write_h5ad(tmp_path / "plain.h5ad")
        store = tmp_path / "plain.zarr"
        build_store([tmp_path / "plain.h5ad"], store, schema="generic")
    capsys.readouterr()
    code = train("latent-delta", f"data.path={store}", f"run.dir={tmp_path / 'run'}",
                 "train.max_steps=2", *extra)  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert ("vae.run" if case == "no_vae" else "roles.perturbation") in err[0]
    assert not (tmp_path / "run" / "final").exists()


def test_the_run_predicts_through_the_cli(tiny, tmp_path):
    from latentcell.launch.cli import main

    controls = tiny.cells[tiny.cells.obs["target_gene"] == "non-targeting"][:60].copy()
    controls.write_h5ad(tmp_path / "ctrl.h5ad")
    label = json.loads((tiny.run / "final" / "model_config.json").read_text())[
        "trained_perturbations"][0]  # fmt: skip
    for mode in ("sampled", "deterministic"):
        out = tmp_path / f"{mode}.h5ad"
        extra = ["--steps", "10", "--guidance", "1.5"] if mode == "sampled" else []
        assert main(["predict", "--run", str(tiny.run), "--controls", str(tmp_path / "ctrl.h5ad"),
                     "--perturbations", label, "--cells-per-perturbation", "30", "--mode", mode,
                     *extra, "--out", str(out)]) == 0  # fmt: skip
        pred = ad.read_h5ad(out)
        n_types = controls.obs["cell_type"].nunique()  # 30 cells per cell type of the controls
        assert pred.n_obs == 60 + 30 * n_types
        assert pred.uns["latentcell"]["predictor"] == f"latent-delta-{mode}"
