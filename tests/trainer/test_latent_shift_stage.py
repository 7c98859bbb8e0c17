"""``latentcell train latent-shift`` through the family contract on a tiny real store with a
split file: the run directory, its model card and split, the MLflow run; the pairing rules
on cells with a known answer; a bad ``model.predictor`` is exit 2 and one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentcell.data_pipelines.perturbation_splits import assign_split, read_split_rows
from latentcell.launch.cli import main
from latentcell.models.latent_shift import MODEL_CLASS
from latentcell.trainer.latent_shift_cells import pair_cells

SPLIT = "[split]\nseed = 1\n[split.cells]\nval_fraction = 0.2\ntest_fraction = 0.1\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("latent_shift")
    synthesize(SynthConfig(n_cells=600, n_genes=50, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=5), root / "cells.h5ad")  # fmt: skip
    build_store([root / "cells.h5ad"], root / "cells.zarr", schema="vcc", chunk_cells=100)
    (root / "split.toml").write_text(SPLIT)
    return root


def train(tiny, run_dir, *extra: str, flags: tuple[str, ...] = ()) -> int:
    sets = [f"data.path={tiny / 'cells.zarr'}", f"split.file={tiny / 'split.toml'}",
            f"run.dir={run_dir}", "train.seed=2", "train.max_steps=200", "train.progress=false",
            "model.n_components=8", *extra]  # fmt: skip
    return main(["train", "latent-shift", *(a for s in sets for a in ("--set", s)), *flags])


def test_a_run_writes_its_card_split_weights_and_one_mlflow_run(tiny, capsys):
    run = tiny / "runs" / "mlp"
    assert train(tiny, run, flags=("--json",)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) >= {"run_dir", "step", "final_weights", "val", "cells_per_s",
                            "mlflow_tracking_uri", "mlflow_run_id"}  # fmt: skip
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["val"]["mse_mean"] < summary["val"]["mse_mean_control"]  # it learned something
    card = json.loads((run / "final" / "model_config.json").read_text())
    assert card["class"] == MODEL_CLASS
    assert (
        card["control_label"] == "non-targeting" and card["roles"]["perturbation"] == "target_gene"
    )
    assert card["embedding"] == {"kind": "pca", "n_components": 8, "decode": "shift"}
    assert set(card["trained_perturbations"]) == set(card["categories"]["perturbation"])
    rows = read_split_rows(run / "split.npz")
    expected = assign_split(tiny / "cells.zarr", tiny / "split.toml")
    np.testing.assert_array_equal(rows["train"], expected.train)
    assert card["split"]["train_rows_sha256"]
    assert card["pairing"]["rule"] == "ot" and card["pairing"]["unpaired"] == 0
    with np.load(run / "final" / "predictor.npz", allow_pickle=False) as f:
        assert f["layer0.weight"].shape == (128, 8 + 3)  # [embedding, onehot of 3 labels]
    assert not list(run.parent.glob("mlp.tmp-*"))  # built beside, renamed into place

    from mlflow.tracking import MlflowClient

    logged = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert logged.data.tags["family"] == "latent-shift"
    assert logged.data.params["model.pairing"] == "ot" and logged.data.params["train.seed"] == "2"
    assert logged.data.metrics["val/mse_mean"] == pytest.approx(summary["val"]["mse_mean"])
    assert [d.dataset.name for d in logged.inputs.dataset_inputs] == ["cells.zarr"]


def test_same_seed_same_model_and_gene_table_descriptors(tiny):
    runs = [tiny / "runs" / f"seeded{i}" for i in range(2)]
    for run in runs:
        assert train(tiny, run, "tracking.enabled=false", "model.descriptor=gene_table",
                     "model.pairing=random", "model.hidden=[16]") == 0  # fmt: skip
    states = [dict(np.load(r / "final" / "predictor.npz")) for r in runs]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])


def test_a_bad_predictor_path_is_exit_2_and_one_line(tiny, capsys):
    code = train(tiny, tiny / "runs" / "bad", "model.predictor=no_such_pkg.models:Ridge")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "model.predictor" in err and "Fix:" in err
    assert not (tiny / "runs" / "bad").exists()


def groups(n_per: int, shift: float, seed: int):
    """Two (cell type, batch) groups, each with controls around its own centre and
    perturbed cells at centre + shift: pairing across groups would be visible."""
    rng = np.random.default_rng(seed)
    emb, ctrl, pert, ct, batch = [], [], [], [], []
    for g, centre in enumerate((0.0, 10.0)):
        for is_ctrl in (True, False):
            emb.append(rng.normal(centre + (0 if is_ctrl else shift), 1.0, size=(n_per, 3)))
            ctrl += [is_ctrl] * n_per
            pert += ["non-targeting" if is_ctrl else "P"] * n_per
            ct += ["T"] * n_per
            batch += [f"b{g}"] * n_per
    return (np.concatenate(emb), np.array(ctrl), np.array(pert), np.array(ct), np.array(batch))


@pytest.mark.parametrize("rule", ["random", "ot"])
def test_pairs_stay_in_their_group_and_keep_the_mean_shift(rule):
    emb, is_ctrl, pert, ct, batch = groups(200, shift=2.0, seed=0)
    p, c, unpaired = pair_cells(emb, is_ctrl, pert, ct, batch, rule, np.random.default_rng(0), 64)
    assert unpaired == 0 and len(p) == (~is_ctrl).sum()
    assert (batch[p] == batch[c]).all() and is_ctrl[c].all() and not is_ctrl[p].any()
    np.testing.assert_allclose((emb[p] - emb[c]).mean(0), 2.0, atol=0.25)
    residual = ((emb[p] - emb[c] - 2.0) ** 2).sum(1).mean()  # 2 * 3 dims for independent pairs
    if rule == "ot":  # a transport plan: 200 cells in 4 chunks of 50, 50 distinct controls each
        assert len(np.unique(c[:50])) == 50
        assert residual < 0.25 * 6.0  # near cells matched: a cell's response is recoverable
    else:
        assert residual == pytest.approx(6.0, rel=0.2)


def test_a_vae_embedding_decodes_through_the_vae(tiny):
    """model.embedding=vae: the posterior means of a count VAE run, decoded by it (sampled
    at the controls' library sizes when the prediction path passes an rng)."""
    from latentcell.inference.latent_shift_predictor import load_predictor
    from latentcell.inference.predict import PredictOptions

    vae = tiny / "runs" / "vae"
    sets = [f"data.path={tiny / 'cells.zarr'}", f"run.dir={vae}", "data.batch_size=64",
            "model.n_latent=4", "model.n_hidden=16", "model.batch_conditioning=false",
            "train.max_steps=3", "train.eval_every=0",
            "train.checkpoint_every=0", "train.progress=false", "tracking.enabled=false"]  # fmt: skip
    assert main(["train", "vae", *(a for s in sets for a in ("--set", s))]) == 0
    run = tiny / "runs" / "on_vae"
    assert train(tiny, run, "tracking.enabled=false", "model.embedding=vae", f"vae.run={vae}") == 0
    card = json.loads((run / "final" / "model_config.json").read_text())
    assert card["embedding"]["kind"] == "vae" and card["embedding"]["n_latent"] == 4
    with np.load(run / "final" / "predictor.npz") as f:
        assert f["layer0.weight"].shape[1] == 4 + 3
    predictor = load_predictor(run, PredictOptions())
    control = np.log1p(np.random.default_rng(0).poisson(2.0, size=(5, 50))).astype(np.float32)
    label = predictor.run_labels.perturbations[0]
    mean = predictor.predict(control, label, "T cell")
    cells = predictor.predict(control, label, "T cell", np.full(5, 1e4), np.random.default_rng(1))
    assert mean.shape == cells.shape == (5, 50) and (cells >= 0).all()
    assert not np.allclose(mean, cells)  # sampled counts, not the decoder's mean
