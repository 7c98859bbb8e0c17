"""``evaluate_generation`` on synthetic NB counts whose right answers are known by design.

Real cells: 3 conditions x 165 cells (each cut into reference / fit / PCA thirds of 55) plus a
"rare" condition of 22 cells (7 reference cells, below the 12 that min_cells="auto" never goes
under, so skipped). The model
under test is a fresh sample from the true distribution; the baseline "swapped" draws the
right cells but gives each the next condition's label.
"""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.generation import evaluate_generation
from latentcell.evaluation.protocol import GenerationProtocol, resolve_min_cells
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
    return nb_cells({**SIZES, "rare": 22}, seed=1)


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
    assert summary["skipped_conditions"] == {
        "rare": {
            "n_cells": 7,
            "reason": "fewer than 12 reference cells, the least the kNN AUC needs (2 * knn_k + 2)",
        }
    }
    assert summary["min_cells"]["used"] == 12 and summary["min_cells"]["auto"] is True


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


# -- the classifier's own column --------------------------------------------------------------

# The four mean profiles of ``nb_cells`` as cell type x stimulation.
TYPE_STIM = {"ctrl": ("T", "ctrl"), "pertA": ("T", "stim"), "pertB": ("B", "ctrl"),
             "rare": ("B", "stim")}  # fmt: skip
WRONG_STIM = {"ctrl": "pertA", "pertA": "ctrl", "pertB": "rare", "rare": "pertB"}


def _type_stim(adata):
    """``condition`` split into the columns cell_type and stim."""
    labels = adata.obs["condition"].astype(str)
    adata.obs["cell_type"] = [TYPE_STIM[c][0] for c in labels]
    adata.obs["stim"] = [TYPE_STIM[c][1] for c in labels]
    return adata


def test_classifier_column_differs_from_the_condition_columns():
    """Generated cells of the right cell type but the other stimulation: a classifier of the
    groups (cell type x stimulation) calls them all wrong, one of cell type all right."""
    real = _type_stim(nb_cells(dict.fromkeys(TYPE_STIM, 165), seed=1))
    generated = _type_stim(nb_cells(dict.fromkeys(TYPE_STIM, 60), seed=2, relabel=WRONG_STIM))
    protocol = GenerationProtocol(n_pcs=10)
    groups = evaluate_generation(generated, real, "cell_type,stim", protocol=protocol)
    types = evaluate_generation(
        generated, real, "cell_type,stim", classifier_col="cell_type", protocol=protocol
    )
    assert groups["classifier"]["column"] == "cell_type,stim"
    assert groups["classifier"]["n_classes"] == 4 and types["classifier"]["n_classes"] == 2
    assert types["classifier"]["column"] == "cell_type"
    assert groups["classifier"]["reference_accuracy"] > 0.95
    assert types["classifier"]["reference_accuracy"] > 0.95
    assert groups["classifier"]["accuracy"]["generated"] < 0.05
    assert types["classifier"]["accuracy"]["generated"] > 0.95
    for summary in (groups, types):  # the Gaussian takes its condition's label
        assert summary["classifier"]["accuracy"]["gaussian_pca"] > 0.9
    # only the classifier changed: the distances are the same
    for part in ("per_condition", "macro"):
        assert groups["methods"]["generated"][part] == types["methods"]["generated"][part]


def test_classifier_column_missing_in_an_input_names_it():
    real = _type_stim(nb_cells(dict.fromkeys(TYPE_STIM, 165), seed=1))
    generated = _type_stim(nb_cells(dict.fromkeys(TYPE_STIM, 60), seed=2))
    del generated.obs["cell_type"]
    with pytest.raises(DataValidationError, match="--classifier-col") as err:
        evaluate_generation(generated, real, "condition", classifier_col="cell_type")
    assert err.value.path == "generated" and err.value.field == "obs['cell_type']"
    with pytest.raises(DataValidationError, match="column not found") as err:
        evaluate_generation(real, real, "condition", classifier_col="cell_type,donor")
    assert err.value.path == "real" and err.value.field == "obs['donor']"


# -- min_cells: auto and explicit -------------------------------------------------------------


def test_resolve_min_cells_clamps_the_smallest_condition():
    auto = GenerationProtocol()  # knn_k=5: floor 12
    assert resolve_min_cells(auto, [55, 70]) == 50  # every condition >= 50: as before
    assert resolve_min_cells(auto, [20, 55]) == 20
    assert resolve_min_cells(auto, [7, 20, 55]) == 12  # never under the kNN AUC's floor
    assert resolve_min_cells(GenerationProtocol(knn_k=3), [5, 20]) == 8
    assert resolve_min_cells(GenerationProtocol(min_cells=30), [7, 20]) == 30
    for bad in (5, "50", 12.0):
        with pytest.raises(ValueError, match="min_cells"):
            GenerationProtocol(min_cells=bad)


def test_auto_min_cells_lets_small_conditions_in_down_to_the_floor():
    """pertB has 20 reference cells, rare 7: with "auto" pertB is scored (at the bar of the
    smallest condition, clamped to the floor of 12) and only rare is skipped, with why."""
    real = nb_cells({"ctrl": 165, "pertA": 165, "pertB": 60}, seed=1)
    generated = nb_cells(dict.fromkeys(CONDITIONS, 60), seed=2)
    protocol = GenerationProtocol(n_pcs=10)
    no_rare = evaluate_generation(generated, real, "condition", protocol=protocol)
    assert no_rare["min_cells"]["used"] == 20 and no_rare["min_cells"]["auto"] is True
    assert "clamped to [12, 50]" in no_rare["min_cells"]["rule"]
    assert no_rare["skipped_conditions"] == {} and no_rare["conditions"] == sorted(CONDITIONS)
    assert no_rare["protocol"]["min_cells"] == "auto"

    real_rare = nb_cells({"ctrl": 165, "pertA": 165, "pertB": 60, "rare": 22}, seed=1)
    summary = evaluate_generation(generated, real_rare, "condition", protocol=protocol)
    assert summary["min_cells"]["used"] == 12
    assert summary["conditions"] == sorted(CONDITIONS)
    assert list(summary["skipped_conditions"]) == ["rare"]
    assert summary["skipped_conditions"]["rare"]["n_cells"] == 7
    assert "kNN AUC" in summary["skipped_conditions"]["rare"]["reason"]
    entry = summary["methods"]["generated"]["per_condition"]["pertB"]
    assert entry["n_cells"] == 20 and entry["knn_auc"] is not None
    for method in ("gaussian_pca", "real_ceiling"):  # 20 fit cells each: scored too
        assert summary["methods"][method]["macro"]["n_conditions"] == 3


def test_explicit_min_cells_skips_below_it_and_says_so():
    real = nb_cells({"ctrl": 165, "pertA": 165, "pertB": 60}, seed=1)
    generated = nb_cells(dict.fromkeys(CONDITIONS, 60), seed=2)
    summary = evaluate_generation(
        generated, real, "condition", protocol=GenerationProtocol(n_pcs=10, min_cells=30)
    )
    assert summary["min_cells"] == {"used": 30, "auto": False, "rule": "given"}
    assert summary["conditions"] == ["ctrl", "pertA"]
    assert summary["skipped_conditions"] == {
        "pertB": {
            "n_cells": 20,
            "reason": "fewer than min_cells=30 reference cells (set explicitly)",
        }
    }
    with pytest.raises(DataValidationError, match="no condition has 80") as err:
        evaluate_generation(
            generated, real, "condition", protocol=GenerationProtocol(n_pcs=10, min_cells=80)
        )
    assert "lower --min-cells" in str(err.value)


# -- several sampling seeds -------------------------------------------------------------------


def _seeded(parts: dict[int, object]):
    """One AnnData of several seeds' cells, ``obs['sampling_seed']`` saying which."""
    for seed, part in parts.items():
        part.obs["sampling_seed"] = seed
        part.obs_names = [f"s{seed}-{n}" for n in part.obs_names]
    return ad.concat(list(parts.values()))


def test_seeds_are_scored_separately_and_reported_as_mean_and_sd(real):
    """Seeds 0 and 1 are fresh samples of the truth, seed 2 has every label swapped: the
    spread over seeds shows it, and each seed scores as it would alone."""
    good = {s: nb_cells(SIZES, seed=10 + s) for s in (0, 1)}
    bad = nb_cells(SIZES, seed=12, relabel=SWAP)
    generated = _seeded({0: good[0].copy(), 1: good[1].copy(), 2: bad.copy()})
    prior = _seeded({5: nb_cells(SIZES, seed=20), 6: nb_cells(SIZES, seed=21)})
    once = nb_cells(SIZES, seed=22)
    protocol = GenerationProtocol(n_pcs=10)
    baselines = {"prior": prior, "once": once}
    summary = evaluate_generation(
        generated, real, "condition", baselines=baselines, protocol=protocol
    )

    report = summary["seeds"]["methods"]
    assert list(report) == ["generated", "prior"]  # "once", the Gaussian, the ceiling: once
    assert report["generated"]["seeds"] == [0, 1, 2] and report["prior"]["seeds"] == [5, 6]
    per_seed = {s: v["macro"]["knn_auc"] for s, v in report["generated"]["per_seed"].items()}
    assert per_seed["2"] > 0.95 and max(per_seed["0"], per_seed["1"]) < 0.65
    mean, sd = report["generated"]["mean"]["knn_auc"], report["generated"]["sd"]["knn_auc"]
    assert min(per_seed.values()) < mean < max(per_seed.values()) and sd > 0.1
    assert mean == pytest.approx(np.mean(list(per_seed.values())))
    assert sd == pytest.approx(np.std(list(per_seed.values()), ddof=1))
    assert summary["methods"]["generated"]["macro"]["knn_auc"] == pytest.approx(mean)
    assert summary["methods"]["generated"]["n_seeds"] == 3
    clf = report["generated"]["per_seed"]["2"]["pooled"]["classifier_accuracy"]
    assert clf < 0.2 and summary["classifier"]["accuracy"]["generated"] > clf

    alone = evaluate_generation(good[1], real, "condition", baselines={"once": once},
                                protocol=protocol)  # fmt: skip
    assert report["generated"]["per_seed"]["1"] == alone["methods"]["generated"]
    for name in ("once", "gaussian_pca", "real_ceiling"):  # same real cells, PCA, reference
        assert summary["methods"][name] == alone["methods"][name]
    assert alone["seeds"]["methods"] == {}


def test_one_seed_is_scored_as_without_the_column(real):
    generated = nb_cells(SIZES, seed=2)
    tagged = generated.copy()
    tagged.obs["sampling_seed"] = 7
    protocol = GenerationProtocol(n_pcs=10)
    plain = evaluate_generation(generated, real, "condition", protocol=protocol)
    assert evaluate_generation(tagged, real, "condition", protocol=protocol) == plain
    tagged.obs["sampling_seed"] = ["a"] * tagged.n_obs
    with pytest.raises(DataValidationError, match="integer seed") as err:
        evaluate_generation(tagged, real, "condition", protocol=protocol)
    assert err.value.field == "obs['sampling_seed']"


def test_every_seed_needs_min_cells_per_condition(real):
    short = nb_cells(SIZES, seed=11)[:100].copy()  # seed 1: only ctrl cells
    generated = _seeded({0: nb_cells(SIZES, seed=10), 1: short})
    with pytest.raises(DataValidationError, match="in sampling_seed 1") as err:
        evaluate_generation(generated, real, "condition", protocol=GenerationProtocol(n_pcs=10))
    assert err.value.path == "generated"
