"""A predictor defined here, outside the library, plugs into the latent-shift family by its
import path alone: ``train latent-shift --set model.predictor=<this module>:RidgePredictor``,
then prediction (``load_predictor`` + ``predict_population``, and ``latentcell predict
--run``) and evaluation (``shift_metrics`` against the split's real test cells)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.population_metrics import shift_metrics
from latentcell.families import family_of_run
from latentcell.inference.predict import (
    PopulationRequest,
    PredictOptions,
    log1p_normalize,
    predict_population,
)
from latentcell.launch.cli import main


class RidgePredictor:
    """Ridge regression of pert_emb on [ctrl_emb, descriptor, 1], in closed form."""

    def __init__(self) -> None:
        self.weights = np.zeros((0, 0), np.float32)

    @staticmethod
    def _design(ctrl_emb, pert_cov) -> np.ndarray:
        return np.hstack([ctrl_emb, pert_cov, np.ones((len(ctrl_emb), 1))]).astype(np.float64)

    def train(self, ctrl_emb, pert_emb, pert_cov, alpha: float = 1.0, **kwargs) -> None:
        x = self._design(ctrl_emb, pert_cov)
        gram = x.T @ x + alpha * np.eye(x.shape[1])
        self.weights = np.linalg.solve(gram, x.T @ pert_emb).astype(np.float32)

    def predict(self, ctrl_emb, pert_cov) -> np.ndarray:
        return (self._design(ctrl_emb, pert_cov) @ self.weights).astype(np.float32)

    def get_state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def set_state(self, state) -> None:
        self.weights = np.asarray(state["weights"], np.float32)


PLUGIN = f"{__name__}:RidgePredictor"


@pytest.fixture(scope="module")
def ridge_run(tmp_path_factory):
    """A run on a tiny store whose split holds out cells (val, test) and one perturbation."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("latent_shift_plugin")
    synthesize(SynthConfig(n_cells=900, n_genes=60, n_perturbations=4, n_cell_types=2,
                           n_batches=2, seed=11), root / "cells.h5ad")  # fmt: skip
    store = root / "cells.zarr"
    build_store([root / "cells.h5ad"], store, schema="vcc", chunk_cells=150)
    labels = sorted(set(ad.read_h5ad(root / "cells.h5ad").obs["target_gene"]) - {"non-targeting"})
    held = labels[-1]
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.3\n"
                     f'[split.perturbations]\ntest = ["{held}"]\n')  # fmt: skip
    sets = [f"data.path={store}", f"split.file={split}", f"run.dir={root / 'run'}",
            f"model.predictor={PLUGIN}", "model.n_components=10", "train.progress=false",
            "tracking.enabled=false"]  # fmt: skip
    assert main(["train", "latent-shift", *(a for s in sets for a in ("--set", s))]) == 0
    assert main(["data", "split", "--store", str(store), "--split", str(split),
                 "--out", str(root / "parts")]) == 0  # fmt: skip
    return root, held


def log1p(cells: ad.AnnData) -> np.ndarray:
    x = np.asarray(cells.X.toarray(), dtype=np.float32)
    return log1p_normalize(x, x.sum(1))


def test_the_plugin_trains_predicts_and_is_evaluated(ridge_run):
    root, held = ridge_run
    run = root / "run"
    card = json.loads((run / "final" / "model_config.json").read_text())
    assert card["predictor"] == PLUGIN
    family = family_of_run(run)
    assert family.name == "latent-shift"
    predictor = family.load("predictor")(run, PredictOptions())
    assert predictor.name == "latent-shift"
    trained = list(predictor.run_labels.perturbations)
    assert held not in trained and len(trained) == 3
    controls = ad.read_h5ad(root / "parts" / "test_controls.h5ad")
    request = PopulationRequest(tuple(trained), cells_per_perturbation=200, seed=0)
    pred = predict_population(predictor, controls, request, "test_controls.h5ad")
    test = ad.read_h5ad(root / "parts" / "test.h5ad")
    ctrl = log1p(controls)
    mine = {x: log1p(pred[(pred.obs["target_gene"] == x).to_numpy()]) for x in trained}
    for label in trained:  # each prediction matches its own perturbation's real shift best
        real = log1p(test[test.obs["target_gene"] == label])
        score = {x: shift_metrics(mine[x], real, ctrl, k=20)["pearson_delta_top"] for x in trained}
        assert max(score, key=score.get) == label and score[label] > 0.5, (label, score)
    # the ridge's saved state reproduces the in-memory predictor's (numpy in, numpy out)
    again = family.load("predictor")(run, PredictOptions())
    x = ctrl[:5]
    np.testing.assert_array_equal(
        again.predict(x, trained[0], "", None, None),
        predictor.predict(x, trained[0], "", None, None),
    )


def test_a_held_out_perturbation_is_refused_in_one_line(ridge_run):
    root, held = ridge_run
    predictor = family_of_run(root / "run").load("predictor")(root / "run", PredictOptions())
    with pytest.raises(DataValidationError, match="never trained") as err:
        predictor.predict(np.zeros((2, 60), np.float32), held, "")
    assert "\n" not in str(err.value) and err.value.path == "--perturbations"


def test_latentcell_predict_runs_the_plugin_from_its_run(ridge_run, capsys):
    root, _ = ridge_run
    out = root / "pred.h5ad"
    assert main(["predict", "--run", str(root / "run"), "--controls",
                 str(root / "parts" / "test_controls.h5ad"), "--perturbations", "all",
                 "--cells-per-perturbation", "20", "--out", str(out)]) == 0  # fmt: skip
    pred = ad.read_h5ad(out)
    assert (pred.obs["source"] == "latent-shift").sum() == 20 * 3 * 2  # 3 labels x 2 types
    assert pred.uns["latentcell"]["predictor"] == "latent-shift"
