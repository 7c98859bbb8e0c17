"""The cvae family's predictor on a run trained on a perturbation store with strong, known
effects: ``latentcell predict --run R --mode a|b`` writes prediction files, Mode B's mean
shift follows the true shift of the held-out cells, and labels the run has no trained
condition for are one line (exit 2)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.cvae_predictor import load_predictor
from latentcell.inference.predict import PredictOptions, log1p_normalize
from latentcell.launch.cli import main
from latentcell.trainer.st_stage import split_source_rows
from tests.cvae_runs import trained_cvae


@pytest.fixture(scope="module")
def cvae(tmp_path_factory):
    run = trained_cvae(tmp_path_factory.mktemp("cvae_predictor"))
    test = run.cells[split_source_rows(run.run, run.store)["test"]].copy()
    test.write_h5ad(run.root / "test.h5ad")
    run.test = test
    return run


def _predict(cvae, out, *extra) -> int:
    return main(["predict", "--run", str(cvae.run), "--controls", str(cvae.root / "test.h5ad"),
                 "--cells-per-perturbation", "15", "--out", str(out), *extra])  # fmt: skip


@pytest.mark.parametrize("mode", ["a", "b"])
def test_predict_run_writes_a_prediction_file(cvae, tmp_path, mode, capsys):
    out = tmp_path / "pred.h5ad"
    assert _predict(cvae, out, "--mode", mode, "--perturbations", "all") == 0
    pred = ad.read_h5ad(out)
    predicted = pred.obs[pred.obs["source"] == f"cvae-{mode}"]
    trained = {x for x in cvae.cells.obs["target_gene"].unique()
               if x != "non-targeting" and x not in cvae.held}  # fmt: skip
    assert set(predicted["target_gene"]) == trained
    assert len(predicted) == 15 * 2 * len(trained)  # x 2 cell types
    x = pred.X.toarray()
    assert np.array_equal(x, np.round(x)) and (x >= 0).all() and x[len(pred.obs) - 1].sum() > 0
    assert pred.uns["latentcell"]["predictor"] == f"cvae-{mode}"


def test_mode_b_mean_shift_follows_the_true_shift(cvae):
    """Per trained perturbation and cell type: the predicted mean shift of the held-out
    controls (re-decoded under the perturbation minus under the control label) against the
    real one (held-out perturbed minus held-out controls), gene by gene."""
    predictor = load_predictor(cvae.run, PredictOptions())
    assert predictor.name == "cvae-b" and predictor.run_labels.pert_col == "target_gene"
    test, genes = cvae.test, predictor.genes
    columns = pd.Index(test.var["gene_id"]).get_indexer(genes)  # the store's keys are ids
    assert (columns >= 0).all()
    counts = test.X.toarray()[:, columns]
    x = log1p_normalize(counts, test.X.toarray().sum(1))
    labels = test.obs["target_gene"].astype(str).to_numpy()
    types = test.obs["cell_type"].astype(str).to_numpy()
    correlations = []
    for label in predictor.run_labels.perturbations:
        for cell_type in predictor.cell_types:
            control = x[(labels == "non-targeting") & (types == cell_type)]
            true = x[(labels == label) & (types == cell_type)].mean(0) - control.mean(0)
            shift = (predictor.predict(control, label, cell_type)
                     - predictor.predict(control, "non-targeting", cell_type)).mean(0)  # fmt: skip
            correlations.append(np.corrcoef(shift, true)[0, 1])
    assert min(correlations) > 0.5, correlations


def test_labels_without_a_trained_condition_are_one_line(cvae, tmp_path, capsys):
    for label, why in (("NOPE", "not in the run's perturbation vocabulary"),
                       (cvae.held[0], "split held it out")):  # fmt: skip
        out = tmp_path / "no.h5ad"
        assert _predict(cvae, out, "--perturbations", label) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {cvae.run}: ")
        assert repr(label) in err and why in err and "Fix:" in err
        assert not out.exists()
    predictor = load_predictor(cvae.run, PredictOptions(mode="a"))
    with pytest.raises(DataValidationError, match="cell type 'neuron'"):
        zeros = np.zeros((2, len(predictor.genes)), np.float32)
        predictor.predict(zeros, predictor.run_labels.perturbations[0], "neuron")
    with pytest.raises(DataValidationError, match="--unseen"):
        load_predictor(cvae.run, PredictOptions(unseen="generic"))
    assert _predict(cvae, tmp_path / "x.h5ad", "--mode", "c", "--perturbations", "all") == 2
