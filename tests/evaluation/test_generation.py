"""``evaluate_generation`` on synthetic NB counts whose right answers are known by design.

Real cells: 3 conditions x 165 cells (each cut into reference / fit / PCA thirds of 55) plus a
"rare" condition of 60 cells (20 reference cells, below min_cells=50, so skipped). The model
under test is a fresh sample from the true distribution; the baseline "swapped" draws the
right cells but gives each the next condition's label.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.generation import evaluate_generation
from latentcell.evaluation.protocol import GenerationProtocol
from tests.evaluation.synthetic import CONDITIONS, nb_cells

SIZES = dict.fromkeys(CONDITIONS, 165)
SWAP = {"ctrl": "pertA", "pertA": "pertB", "pertB": "ctrl"}
PER_CONDITION_KEYS = {
    "n_cells",
    "mmd",
    "energy_distance",
    "wasserstein",
    "knn_auc",
    "precision",
    "recall",
    "density",
    "coverage",
    "mean_pearson",
    "mean_r2",
    "var_pearson",
    "var_r2",
    "zero_frac_mae",
    "zero_frac_pearson",
    "sparsity_real",
    "sparsity_generated",
    "per_gene_wasserstein",
    "distance_to_training_ratio",
}


@pytest.fixture(scope="module")
def real():
    return nb_cells({**SIZES, "rare": 60}, seed=1)


@pytest.fixture(scope="module")
def run(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    generated = nb_cells(SIZES, seed=2)
    swapped = nb_cells(SIZES, seed=3, relabel=SWAP)
    summary = evaluate_generation(
        generated, real, "condition", baselines={"swapped": swapped}, out_dir=out
    )
    return summary, out


def _macro(summary, method, key):
    entry = summary["methods"][method]
    return {**entry["macro"], **entry["pooled"]}[key]


def test_reports_every_method_and_metric(run):
    summary, _ = run
    assert list(summary["methods"]) == ["generated", "swapped", "gaussian_pca", "real_ceiling"]
    for entry in summary["methods"].values():
        assert set(entry["per_condition"]) == set(CONDITIONS)
        for values in entry["per_condition"].values():
            assert set(values) == PER_CONDITION_KEYS
            assert values["n_cells"] == 55  # equal sizes: one third of 165 on both sides
        assert entry["macro"]["n_conditions"] == 3
        assert set(entry["pooled"]) == {"silhouette_by_condition", "classifier_accuracy"}
    assert summary["n_genes_used"] == 300 and summary["n_pcs_used"] == 50


def test_real_resampled_ranks_best_and_swapped_labels_are_clearly_worse(run):
    summary, _ = run
    good = ("real_ceiling", "generated")
    for key in ("energy_distance", "mmd", "wasserstein", "per_gene_wasserstein"):
        worst_good = max(_macro(summary, g, key) for g in good)
        assert worst_good < _macro(summary, "gaussian_pca", key) < _macro(summary, "swapped", key)
    for g in good:
        assert abs(_macro(summary, g, "knn_auc") - 0.5) < 0.1
        assert _macro(summary, g, "precision") > 0.7 and _macro(summary, g, "recall") > 0.7
        assert _macro(summary, g, "mean_pearson") > 0.95
        assert _macro(summary, g, "classifier_accuracy") > 0.9
    assert _macro(summary, "swapped", "energy_distance") > 20 * _macro(
        summary, "generated", "energy_distance"
    )
    assert _macro(summary, "swapped", "knn_auc") > 0.95
    assert _macro(summary, "swapped", "classifier_accuracy") < 0.2
    assert _macro(summary, "swapped", "coverage") < 0.1


def test_classifier_reports_real_reference_accuracy(run):
    summary, _ = run
    classifier = summary["classifier"]
    assert classifier["reference_accuracy"] > 0.9
    assert classifier["accuracy"]["real_ceiling"] == classifier["reference_accuracy"]
    assert classifier["accuracy"]["swapped"] < 0.2
    assert classifier["n_train_cells"] == 3 * 55


def test_small_condition_is_skipped_and_listed(run):
    summary, _ = run
    assert summary["conditions"] == sorted(CONDITIONS)
    assert summary["skipped_conditions"] == {"rare": 20}


def test_summary_and_figures_written_with_the_protocol(run):
    summary, out = run
    text = (out / "summary.json").read_text()
    on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert on_disk == summary
    assert summary["protocol"] == json.loads(json.dumps(GenerationProtocol().as_dict()))
    assert summary["protocol"]["pca_fit"] == "held_out"
    assert set(summary["cell_roles"]) == {"reference", "fit", "pca", "hvg"}
    for name in ("pca_real_vs_generated.png", "metrics_vs_baselines.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_vs_baselines.png",
        "pca_real_vs_generated.png",
        "summary.json",
    ]  # no temporary files left behind


def test_silhouette_of_generated_matches_real(run):
    summary, _ = run
    real_silhouette = summary["silhouette_real"]
    assert real_silhouette > 0.2
    assert _macro(summary, "generated", "silhouette_by_condition") == pytest.approx(
        real_silhouette, abs=0.1
    )


def test_with_train_the_ceiling_comes_from_train(real):
    train = nb_cells(dict.fromkeys(CONDITIONS, 120), seed=4)
    generated = nb_cells(dict.fromkeys(CONDITIONS, 60), seed=5)
    real_main = real[real.obs["condition"] != "rare"].copy()
    protocol = GenerationProtocol(n_pcs=20, max_cells_per_condition=60)
    summary = evaluate_generation(generated, real_main, "condition", train=train, protocol=protocol)
    assert summary["cell_roles"]["reference"] == "real: all cells"
    assert summary["cell_roles"]["fit"] == "train: first half"
    ceiling = summary["methods"]["real_ceiling"]
    assert {v["n_cells"] for v in ceiling["per_condition"].values()} == {60}
    assert abs(ceiling["macro"]["knn_auc"] - 0.5) < 0.15
    assert summary["classifier"]["n_train_cells"] == 3 * 60
    # memorization check against ALL training cells: fresh cells ~1, none for the ceiling
    assert 0.7 < summary["methods"]["generated"]["macro"]["distance_to_training_ratio"] < 1.4
    assert ceiling["macro"]["distance_to_training_ratio"] is None  # nan, written as null
    copies = train[train.obs["condition"].isin(CONDITIONS)].copy()  # a model that memorized
    copied = evaluate_generation(copies, real_main, "condition", train=train, protocol=protocol)
    assert copied["methods"]["generated"]["macro"]["distance_to_training_ratio"] < 0.05


def test_condition_unseen_in_train_has_no_ceiling_there(real):
    """A held-out perturbation: train lacks it, so only the model is scored on it."""
    train = nb_cells({"ctrl": 120, "pertA": 120}, seed=4)
    generated = nb_cells(dict.fromkeys(CONDITIONS, 60), seed=5)
    protocol = GenerationProtocol(n_pcs=10, max_cells_per_condition=60)
    real_main = real[real.obs["condition"] != "rare"].copy()
    summary = evaluate_generation(generated, real_main, "condition", train=train, protocol=protocol)
    assert summary["conditions"] == ["ctrl", "pertA", "pertB"]
    for method in ("real_ceiling", "gaussian_pca"):
        entry = summary["methods"][method]
        assert entry["per_condition"]["pertB"]["not_evaluated"] == "fewer than min_cells"
        assert entry["macro"]["n_conditions"] == 2
    assert summary["methods"]["generated"]["macro"]["n_conditions"] == 3
    assert summary["classifier"]["n_train_cells"] == 2 * 60


def test_reference_pca_mode_runs_and_is_logged(real):
    generated = nb_cells(SIZES, seed=2)
    protocol = GenerationProtocol(pca_fit="reference", n_pcs=10)
    summary = evaluate_generation(generated, real, "condition", protocol=protocol)
    assert summary["protocol"]["pca_fit"] == "reference"
    assert summary["cell_roles"]["pca"] == "the reference cells (in-sample)"
    assert summary["methods"]["generated"]["per_condition"]["ctrl"]["n_cells"] == 82  # halves


def test_gaussian_gene_metrics_are_decoded_and_finite(run):
    summary, _ = run
    macro = summary["methods"]["gaussian_pca"]["macro"]
    for key in ("mean_pearson", "var_pearson", "zero_frac_mae", "per_gene_wasserstein"):
        assert macro[key] is not None and math.isfinite(macro[key])
    assert macro["mean_pearson"] > 0.9


def test_gene_mismatch_raises_naming_the_input(real):
    generated = nb_cells(SIZES, seed=2)[:, :290].copy()
    with pytest.raises(DataValidationError, match=r"10 of the 300 real genes are missing") as err:
        evaluate_generation(generated, real, "condition")
    assert err.value.path == "generated" and "'gene290'" in str(err.value)


def test_missing_condition_column_and_non_counts_raise(real):
    generated = nb_cells(SIZES, seed=2)
    with pytest.raises(DataValidationError, match="column not found"):
        evaluate_generation(generated, real, "cell_type")
    logged = generated.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(DataValidationError, match="raw counts are required") as err:
        evaluate_generation(logged, real, "condition")
    assert err.value.field == "X"


def test_generated_missing_a_condition_raises(real):
    generated = nb_cells({"ctrl": 165, "pertA": 165}, seed=2)
    with pytest.raises(DataValidationError, match="fewer than min_cells") as err:
        evaluate_generation(generated, real, "condition")
    assert "pertB" in str(err.value)


def test_reserved_baseline_name_raises(real):
    generated = nb_cells(SIZES, seed=2)
    with pytest.raises(DataValidationError, match="reserved"):
        evaluate_generation(generated, real, "condition", baselines={"real_ceiling": generated})


def _two_columns(adata):
    """The condition as two columns (group, variant) and as their hand-made combination."""
    out = adata.copy()
    parts = {"ctrl": ("c", "x"), "pertA": ("p", "A"), "pertB": ("p", "B"), "rare": ("r", "x")}
    labels = out.obs["condition"].astype(str)
    out.obs["group"] = [parts[c][0] for c in labels]
    out.obs["variant"] = [parts[c][1] for c in labels]
    out.obs["combo"] = out.obs["group"] + " | " + out.obs["variant"]
    return out


def test_several_condition_columns_group_by_their_combination(real):
    """--condition-col group,variant scores exactly what a hand-made combined column does."""
    real2, generated = _two_columns(real), _two_columns(nb_cells(SIZES, seed=2))
    both = evaluate_generation(generated, real2, "group,variant")
    combo = evaluate_generation(generated, real2, "combo")
    assert set(both["methods"]["generated"]["per_condition"]) == {"c | x", "p | A", "p | B"}
    for method in ("generated", "gaussian_pca", "real_ceiling"):  # "r | x" is rare: skipped
        for part in ("per_condition", "macro"):
            assert both["methods"][method][part] == combo["methods"][method][part]
    with pytest.raises(DataValidationError, match="column not found") as err:
        evaluate_generation(generated, real2, "group,batch")
    assert err.value.field == "obs['batch']"
