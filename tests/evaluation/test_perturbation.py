"""``evaluate_perturbation`` (cell-eval) on synthetic NB counts whose right answers are known.

200 genes; the control and every perturbation have 60 cells; each perturbation multiplies 20
genes by 4 and 20 by 0.25 (its own genes). ``real``: the control and pA-pD; ``train``: the
control and four OTHER perturbations (as in the VCC, test perturbations are unseen in training).
The ``good`` prediction is a fresh draw from the true model plus real's control cells; the
``null`` one relabels real's control cells as every perturbation (no effect at all).
cell-eval's numba JIT costs about 30 s once per process, so there is one full run of each
prediction (the good one through the CLI); the input checks fail before cell-eval runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.degenerate_metrics import CELL_EVAL_LOGGER, CellEvalErrors
from latentcell.evaluation.perturbation import (
    control_warnings,
    evaluate_perturbation,
    import_cell_eval,
    log_normalized,
    train_mean_baseline,
)
from latentcell.launch.cli import main

os.environ.setdefault("POLARS_MAX_THREADS", "2")  # before cell-eval imports polars
pytest.importorskip("cell_eval")
# cell-eval's own noise: polars' string-cache deprecation, pearsonr of a constant input (the
# baseline's identical cells; the metric is then null), 0/0 when scoring a perfect baseline.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:cell_eval"),
    pytest.mark.filterwarnings("ignore:An input array is constant"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning"),
]

N_GENES, N_CELLS, CTRL, COL = 200, 60, "non-targeting", "target_gene"
PERTS = ("pA", "pB", "pC", "pD")
TRAIN_PERTS = ("pE", "pF", "pG", "pH")


def _means() -> dict[str, np.ndarray]:
    """NB means: a shared base; each perturbation 4x on 20 genes, 0.25x on 20 others."""
    rng = np.random.default_rng(7)
    base = rng.gamma(2.0, 2.5, size=N_GENES) + 0.5
    out = {CTRL: base}
    for pert in PERTS + TRAIN_PERTS:
        genes = rng.permutation(N_GENES)[:40]
        factor = np.ones(N_GENES)
        factor[genes[:20]], factor[genes[20:]] = 4.0, 0.25
        out[pert] = base * factor
    return out


def _cells(groups: tuple[str, ...], seed: int) -> ad.AnnData:
    """NB(5) counts, N_CELLS per group, with log-normal library-size noise; ``pZ`` has no
    effect at all (the control's means)."""
    rng = np.random.default_rng(seed)
    means = _means()
    means["pZ"] = means[CTRL]
    blocks = []
    for group in groups:
        mu = means[group] * rng.lognormal(0.0, 0.2, size=(N_CELLS, 1))
        blocks.append(rng.negative_binomial(5, 5.0 / (5.0 + mu)))
    labels = np.repeat(groups, N_CELLS)
    obs = pd.DataFrame({COL: labels}, index=[f"s{seed}c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    return adata


def _controls(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs[COL] == CTRL].copy()


def _relabelled(adata: ad.AnnData, label: str) -> ad.AnnData:
    out = adata.copy()
    out.obs[COL] = label
    out.obs_names = [f"{label}_{name}" for name in out.obs_names]
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, ad.AnnData]:
    real = _cells((CTRL, *PERTS), seed=1)
    ctrl = _controls(real)
    return {
        "real": real,
        "train": _cells((CTRL, *TRAIN_PERTS), seed=2),
        "good": ad.concat([ctrl, _cells(PERTS, seed=3)]),
        "null": ad.concat([ctrl, *(_relabelled(ctrl, p) for p in PERTS)]),
    }


@pytest.fixture(scope="module")
def good(data, tmp_path_factory):
    """The good prediction through ``latentcell evaluate perturbation`` (in process)."""
    root = tmp_path_factory.mktemp("cli")
    paths = {name: root / f"{name}.h5ad" for name in ("good", "real", "train")}
    for name, path in paths.items():
        data[name].write_h5ad(path)
    out = root / "out"
    argv = ["evaluate", "perturbation", "--pred", str(paths["good"]), "--real"]
    argv += [str(paths["real"]), "--train", str(paths["train"]), "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--threads", "2"]) == 0
    return json.loads((out / "summary.json").read_text()), out, printed.getvalue()


@pytest.fixture(scope="module")
def null(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("null") / "out"
    return evaluate_perturbation(data["null"], data["real"], data["train"], out, threads=2)


def test_true_model_beats_the_training_mean_baseline(good):
    summary, _, _ = good
    head = summary["headline"]
    assert head["avg_score"]["model"] > 0.3
    assert head["vcc_avg_score"]["model"] > 0.3
    for metric in ("overlap_at_N", "discrimination_score_l1", "pearson_delta"):
        assert head[metric]["model"] > head[metric]["baseline"]
    assert head["mae"]["model"] < head["mae"]["baseline"]
    energy = summary["energy_distance"]
    assert energy["model"] < energy["baseline"] / 5


def test_no_effect_prediction_scores_below_the_true_model(good, null):
    head, null_head = good[0]["headline"], null["headline"]
    assert null_head["avg_score"]["model"] < 0.1 < head["avg_score"]["model"]
    assert null_head["overlap_at_N"]["model"] == 0.0  # no DE genes predicted
    assert null["energy_distance"]["model"] > 5 * good[0]["energy_distance"]["model"]


def test_summary_fields_files_and_ceiling(good):
    summary, out, printed = good
    for key in ("avg_score", "overlap_at_N", "discrimination_score_l1", "mae", "pearson_delta"):
        assert {"model", "baseline", "ceiling"} <= set(summary["headline"][key])
    assert "avg_score" in summary["scores"] and "pr_auc" in summary["scores"]
    ceiling = summary["headline"]
    assert 0.5 < ceiling["overlap_at_N"]["ceiling"] <= 1.0
    assert ceiling["mae"]["ceiling"] is None  # cell-eval defines no ceiling for errors
    assert summary["metrics"]["ceiling_raw_half_depth"]["mae"] > 0
    for name in summary["files"].values():
        assert (out / name).is_file(), name
    assert not (out / "baseline" / "real_de.csv").exists()  # real DE computed once
    assert summary["warnings"] == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert "avg_score" in printed and "energy_PCA" in printed and "wrote" in printed


def test_seed_scoreboards_for_model_and_baseline(good):
    """The seeds' scoreboards of the same run: the true model beats the training mean in gene
    and embedding space; per-perturbation values, the figure and the printed rows are there."""
    summary, out, printed = good
    boards = summary["scoreboards"]
    model, baseline = boards["model"], boards["baseline"]
    keys = {"mean_shift_pearson", "jaccard_top25", "jaccard_top50", "jaccard_top100"}
    keys |= {"embedding_r2", "embedding_mse", "embedding_energy_distance"}
    keys |= {"knn_purity_k10", "knn_purity_k20", "knn_purity_k50"}
    assert set(model) == set(baseline) == keys and boards["degenerate"] == {}
    assert model["mean_shift_pearson"] > 0.8 > baseline["mean_shift_pearson"]
    for method in ("model", "baseline"):  # cell-eval's pearson_delta, the same controls
        cell_eval_r = summary["metrics"][method]["pearson_delta"]
        assert boards[method]["mean_shift_pearson"] == pytest.approx(cell_eval_r, abs=1e-4)
    assert model["jaccard_top25"] > baseline["jaccard_top25"]
    assert model["embedding_r2"] > 0.8 and baseline["embedding_r2"] <= 1e-9  # same for all
    assert model["knn_purity_k10"] > 0.8 > baseline["knn_purity_k10"]
    assert model["embedding_energy_distance"] < baseline["embedding_energy_distance"]
    table = pd.read_csv(out / summary["files"]["scoreboard_per_perturbation"])
    assert sorted(zip(table["method"], table["perturbation"], strict=True)) == sorted(
        (method, pert) for method in ("baseline", "model") for pert in PERTS
    )
    assert table[table["method"] == "model"]["jaccard_top50"].mean() == pytest.approx(
        model["jaccard_top50"]
    )
    figure = out / summary["files"]["scoreboard_figure"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seed scoreboards" in printed and "knn_purity_k10" in printed


def test_baseline_is_the_training_mean_with_real_controls(data):
    cell_eval = import_cell_eval(2)
    train = log_normalized(data["train"], COL, "train")
    real = log_normalized(data["real"], COL, "real")
    baseline = train_mean_baseline(cell_eval, train, real, COL, CTRL, threads=2)
    x = train.X.toarray()
    groups = train.obs[COL].to_numpy()
    expected = np.mean([x[groups == g].mean(axis=0) for g in np.unique(groups)], axis=0)
    labels = baseline.obs[COL].to_numpy()
    np.testing.assert_allclose(
        baseline.X[labels == "pA"].toarray(), [expected] * N_CELLS, atol=1e-5
    )
    np.testing.assert_array_equal(
        baseline.X[labels == CTRL].toarray(), real.X[real.obs[COL].to_numpy() == CTRL].toarray()
    )


def _expect_error(data, tmp_path, pred, field, fix_part, **kwargs) -> DataValidationError:
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as err:
        evaluate_perturbation(pred, data["real"], data["train"], out, **kwargs)
    assert err.value.path == "pred" and err.value.field == field
    assert fix_part in err.value.fix
    assert not out.exists()
    return err.value


def test_gene_order_mismatch(data, tmp_path):
    pred = data["good"][:, data["good"].var_names[::-1]].copy()
    err = _expect_error(data, tmp_path, pred, "var_names", "real.var_names")
    assert "another order" in err.problem


def test_missing_control_cells(data, tmp_path):
    good = data["good"]
    pred = good[good.obs[COL] != CTRL].copy()
    _expect_error(data, tmp_path, pred, f"obs['{COL}']", "copy REAL's control cells")


def test_missing_perturbation(data, tmp_path):
    good = data["good"]
    pred = good[good.obs[COL] != "pC"].copy()
    err = _expect_error(data, tmp_path, pred, f"obs['{COL}']", "every perturbation")
    assert "'pC'" in err.problem


def test_constant_predicted_cells(data, tmp_path):
    pred = data["good"].copy()
    rows = np.flatnonzero(pred.obs[COL] == "pB")
    pred.X[rows] = np.round(pred.X[rows].mean(axis=0))
    err = _expect_error(data, tmp_path, pred, "X", "cell-level variation")
    assert "'pB'" in err.problem


def test_cli_names_the_file_and_exits_2(data, tmp_path, capsys):
    pred, real = tmp_path / "pred.h5ad", tmp_path / "real.h5ad"
    data["good"][:, data["good"].var_names[::-1]].copy().write_h5ad(pred)
    data["real"].write_h5ad(real)
    argv = ["evaluate", "perturbation", "--pred", str(pred), "--real", str(real)]
    argv += ["--train", str(real), "--out", str(tmp_path / "out"), "--threads", "1"]
    assert main(argv) == 2
    assert f"error: {pred}: var_names" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_control_warnings(data):
    real, good = data["real"], data["good"]
    assert control_warnings(good, real, COL, CTRL) == []
    fewer = good[N_CELLS // 2 :].copy()  # half of the control cells dropped
    assert "30 control cells, real has 60" in control_warnings(fewer, real, COL, CTRL)[0]
    other = ad.concat([_controls(data["train"]), good[good.obs[COL] != CTRL]])
    assert "differ from real's" in control_warnings(other, real, COL, CTRL)[0]


def test_missing_cell_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cell_eval", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r'pip install "latentcell\[celleval\]"'):
        import_cell_eval(1)


# ---------------------------------------------------------------- degenerate metrics

LOWER_BETTER = ("mse", "mae", "mse_delta", "mae_delta")


def _reference_scores(out, metrics, keep) -> dict[str, float]:
    """The VCC scaling written from its formula, on cell-eval's per-perturbation tables:
    means over the perturbations ``keep``, higher-better (u - b) / (1 - b), lower-better
    1 - u / b, clipped at 0."""
    model = pd.read_csv(out / "model" / "results.csv", index_col="perturbation").loc[keep]
    base = pd.read_csv(out / "baseline" / "results.csv", index_col="perturbation").loc[keep]
    scores = {}
    for metric in metrics:
        u, b = model[metric].mean(), base[metric].mean()
        score = 1 - u / b if metric in LOWER_BETTER else (u - b) / (1 - b)
        scores[metric] = max(score, 0.0)
    return scores


class Recorded(logging.Handler):
    """Every log message that reaches the root logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def one_perturbation(tmp_path_factory):
    """One perturbation (pA) through the CLI: real, train (another perturbation) and a
    prediction drawn from the true model."""
    root = tmp_path_factory.mktemp("one")
    real = _cells((CTRL, "pA"), seed=1)
    files = {
        "real": real,
        "train": _cells((CTRL, "pE"), seed=2),
        "pred": ad.concat([_controls(real), _cells(("pA",), seed=3)]),
    }
    for name, adata in files.items():
        adata.write_h5ad(root / f"{name}.h5ad")
    out = root / "out"
    argv = ["evaluate", "perturbation", "--out", str(out), "--threads", "2"]
    for name in files:
        argv += [f"--{name}", str(root / f"{name}.h5ad")]
    printed, recorded = io.StringIO(), Recorded()
    logging.getLogger().addHandler(recorded)
    try:
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
    finally:
        logging.getLogger().removeHandler(recorded)
    summary = json.loads((out / "summary.json").read_text())
    return summary, out, printed.getvalue(), recorded.messages


def test_one_perturbation_lists_degenerate_metrics_and_scores_the_rest(one_perturbation):
    summary, out, printed, logged = one_perturbation
    degenerate = summary["degenerate"]
    for metric in (
        "discrimination_score_l1",
        "discrimination_score_l2",
        "discrimination_score_cosine",
    ):
        assert "one perturbation" in degenerate[metric]
        assert summary["metrics"]["model"][metric] == 1.0  # what cell-eval reports regardless
    for metric in ("pearson_edistance", "de_spearman_sig", "clustering_agreement"):
        assert metric in degenerate
    scores = summary["scores"]
    assert not set(degenerate) & set(scores)
    for metric in ("pearson_delta", "mae", "overlap_at_N"):  # the meaningful ones stay
        assert metric in scores
    assert summary["energy_distance"]["model"] < summary["energy_distance"]["baseline"]
    # avg_score: the mean of the remaining scores, each recomputed here from its formula
    metrics = [k for k in scores if k != "avg_score"]
    reference = _reference_scores(out, metrics, ["pA"])
    for metric in metrics:
        assert scores[metric] == pytest.approx(reference[metric], abs=1e-6), metric
    assert scores["avg_score"] == pytest.approx(np.mean(list(reference.values())), abs=1e-6)
    # cell-eval's own number beside it, labelled: the avg of its score.csv, zeros included
    head = summary["headline"]
    cell_eval_avg = pd.read_csv(out / "score.csv").set_index("metric").loc["avg_score"].iloc[0]
    assert head["cell_eval_avg_score"]["model"] == pytest.approx(cell_eval_avg)
    assert head["cell_eval_avg_score"]["model"] < head["avg_score"]["model"]
    assert head["discrimination_score_l1"]["score"] is None
    assert "one perturbation" in head["discrimination_score_l1"]["degenerate"]
    assert head["vcc_avg_score"]["model"] is None  # one of its three metrics is degenerate
    # printed: the table says which metrics were left out, and why
    assert "degenerate for this input" in printed and "discrimination_score_l1" in printed
    assert "cell-eval avg" in printed
    boards = summary["scoreboards"]  # one perturbation: R² and purity say nothing
    assert boards["model"]["embedding_r2"] is None and "knn_purity_k10" in boards["degenerate"]
    assert boards["model"]["mean_shift_pearson"] > boards["baseline"]["mean_shift_pearson"]
    # cell-eval's errors for the metrics degenerate by construction are not printed
    assert not [m for m in logged if m.startswith("Error computing metric")], logged


def test_de_metrics_skip_perturbations_without_real_de_genes(tmp_path):
    """pZ has no effect, so no real DE gene: its overlap is 0 for every method. The DE
    metrics are averaged over pA..pC only (computed here from cell-eval's results.csv)."""
    real = _cells((CTRL, "pA", "pB", "pC", "pZ"), seed=1)
    pred = ad.concat([_controls(real), _cells(("pA", "pB", "pC", "pZ"), seed=3)])
    train = _cells((CTRL, "pE", "pF"), seed=2)
    summary = evaluate_perturbation(pred, real, train, tmp_path / "out", threads=2)
    restricted = summary["restricted"]
    assert restricted["perturbations_left_out"] == ["pZ"]
    assert "overlap_at_N" in restricted["metrics"] and "pearson_delta" not in restricted["metrics"]
    results = pd.read_csv(tmp_path / "out" / "model" / "results.csv", index_col="perturbation")
    assert results.loc["pZ", "overlap_at_N"] == 0.0  # cell-eval's value there, meaningless
    kept = results.loc[["pA", "pB", "pC"], "overlap_at_N"].mean()
    assert summary["meaningful_metrics"]["model"]["overlap_at_N"] == pytest.approx(kept)
    assert summary["headline"]["overlap_at_N"]["model"] == pytest.approx(kept)
    assert summary["metrics"]["model"]["overlap_at_N"] < kept  # cell-eval's, pZ's 0 included
    # the ceiling averages pZ too: not comparable, so the headline shows none for overlap
    assert summary["headline"]["overlap_at_N"]["ceiling"] is None
    assert summary["metrics"]["ceiling"]["overlap_at_N"] is not None
    assert summary["headline"]["pearson_delta"]["ceiling"] is not None  # not restricted
    reference = _reference_scores(tmp_path / "out", ["overlap_at_N"], ["pA", "pB", "pC"])
    assert summary["scores"]["overlap_at_N"] == pytest.approx(reference["overlap_at_N"])
    assert "pr_auc" in summary["scores"]  # NaN at pZ made cell-eval's null; restricted, kept
    assert "discrimination_score_l1" not in summary["degenerate"]  # 4 perturbations


def test_cell_eval_error_filter_silences_only_the_expected_metrics(caplog):
    logger = logging.getLogger(CELL_EVAL_LOGGER)
    with caplog.at_level(logging.ERROR, logger=CELL_EVAL_LOGGER):
        with CellEvalErrors({"pearson_edistance"}) as errors:
            logger.error("Error computing metric 'pearson_edistance': too few points")
            logger.error("Error computing metric 'mae': a real failure")
        logger.error("Error computing metric 'pearson_edistance': after the run")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Error computing metric 'mae': a real failure",
        "Error computing metric 'pearson_edistance': after the run",
    ]
    assert errors.errors == {"pearson_edistance": "too few points", "mae": "a real failure"}
