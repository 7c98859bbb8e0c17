"""Baselines on training cells whose answers are computed here independently: control
identity, training cell-mean shift, additive combinations, the linear (PCA ridge) model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.perturbation_baselines import fit_baseline
from latentcell.trainer.predict import log1p_normalize

GENES = [f"G{i}" for i in range(30)]


def training_cells(seed: int = 0) -> ad.AnnData:
    """Controls and single perturbations of G0..G3 in two cell types; each perturbation
    multiplies a known block of genes by 3 (and knocks its target down)."""
    rng = np.random.default_rng(seed)
    rows, labels, types = [], [], []
    base = rng.gamma(2.0, 2.0, len(GENES))
    for cell_type, scale in (("T", 1.0), ("B", 1.5)):
        for label in ("non-targeting", "G0", "G1", "G2", "G3"):
            mu = base * scale
            if label != "non-targeting":
                g = int(label[1:])
                mu = mu.copy()
                mu[10 + 5 * g : 15 + 5 * g] *= 3
                mu[g] *= 0.2
            rows.append(rng.poisson(mu, size=(60, len(GENES))))
            labels += [label] * 60
            types += [cell_type] * 60
    obs = pd.DataFrame({"target_gene": labels, "cell_type": types})
    obs.index = obs.index.astype(str)
    return ad.AnnData(
        X=sp.csr_matrix(np.concatenate(rows).astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=GENES),
    )


def logx(a: ad.AnnData) -> np.ndarray:
    counts = a.X.toarray()
    return log1p_normalize(counts, counts.sum(1))


def test_control_identity_and_training_mean_shift():
    train = training_cells()
    x, obs = logx(train), train.obs
    control = np.abs(np.random.default_rng(1).normal(1, 0.3, (5, len(GENES)))).astype(np.float32)
    ident = fit_baseline("control", train, GENES)
    np.testing.assert_array_equal(ident.predict(control, "G1", "T"), control)

    mean = fit_baseline("mean", train, GENES)
    is_t = (obs.cell_type == "T").to_numpy()
    ctrl = (obs.target_gene == "non-targeting").to_numpy()
    shift = x[is_t & ~ctrl].mean(0) - x[is_t & ctrl].mean(0)
    np.testing.assert_allclose(
        mean.predict(control, "G2", "T"), np.clip(control + shift, 0, None), rtol=1e-5
    )
    # the same for every perturbation: that is the baseline
    np.testing.assert_array_equal(
        mean.predict(control, "G0", "T"), mean.predict(control, "G3", "T")
    )


def test_additive_sums_single_gene_shifts():
    train = training_cells()
    x, obs = logx(train), train.obs
    add = fit_baseline("additive", train, GENES)
    ctrl = (obs.target_gene == "non-targeting").to_numpy()
    zero = np.full((1, len(GENES)), 50.0, dtype=np.float32)  # far from the clip at 0
    d = {g: x[(obs.target_gene == g).to_numpy()].mean(0) - x[ctrl].mean(0) for g in ("G0", "G2")}
    np.testing.assert_allclose(add.predict(zero, "G0", "T")[0] - 50, d["G0"], atol=1e-4)
    np.testing.assert_allclose(
        add.predict(zero, "G0+G2", "T")[0] - 50, d["G0"] + d["G2"], atol=1e-4
    )
    with pytest.raises(DataValidationError, match="G7"):
        add.predict(zero, "G0+G7", "T")


def test_linear_model_recovers_seen_effects_and_embeds_measured_genes():
    train = training_cells()
    x, obs = logx(train), train.obs
    lin = fit_baseline("linear", train, GENES, n_components=8, ridge=1e-3)
    ctrl = (obs.target_gene == "non-targeting").to_numpy()
    base = np.full((1, len(GENES)), 50.0, dtype=np.float32)
    for g in ("G0", "G1", "G2", "G3"):
        truth = x[(obs.target_gene == g).to_numpy()].mean(0) - x[ctrl].mean(0)
        pred = lin.predict(base, g, "T")[0] - 50
        assert np.corrcoef(truth, pred)[0, 1] > 0.8, g
    unseen = lin.predict(base, "G20", "T")  # measured, never perturbed: zero-shot
    assert np.isfinite(unseen).all()
    with pytest.raises(DataValidationError, match="neither measured nor seen"):
        lin.predict(base, "TP53", "T")


def test_unknown_baseline_and_missing_controls_are_clear_errors():
    train = training_cells()
    with pytest.raises(DataValidationError, match="one of"):
        fit_baseline("oracle", train, GENES)
    no_ctrl = train[train.obs.target_gene != "non-targeting"].copy()
    with pytest.raises(DataValidationError, match="non-targeting"):
        fit_baseline("mean", no_ctrl, GENES)


def test_linear_model_embeds_an_unmeasured_seen_target_by_its_response():
    train = training_cells()
    train.obs["target_gene"] = train.obs["target_gene"].replace({"G3": "NOTGENE"})
    x, obs = logx(train), train.obs
    lin = fit_baseline("linear", train, GENES, n_components=8, ridge=1e-3)
    ctrl = (obs.target_gene == "non-targeting").to_numpy()
    truth = x[(obs.target_gene == "NOTGENE").to_numpy()].mean(0) - x[ctrl].mean(0)
    base = np.full((1, len(GENES)), 50.0, dtype=np.float32)
    assert np.corrcoef(truth, lin.predict(base, "NOTGENE", "T")[0] - 50)[0, 1] > 0.8


def test_train_basal_recentres_the_controls_on_the_training_controls():
    """basal='train': the given controls' mean is replaced by the training controls' mean of
    their cell type before the shift, so the prediction's mean no longer follows the
    controls' sample mean; their cell-to-cell deviations are kept."""
    train = training_cells()
    x, obs = logx(train), train.obs
    ctrl_b = ((obs.cell_type == "B") & (obs.target_gene == "non-targeting")).to_numpy()
    rng = np.random.default_rng(2)
    control = x[ctrl_b][:8] + rng.normal(0, 0.05, (8, len(GENES))).astype(np.float32) + 0.5
    ident = fit_baseline("control", train, GENES, basal="train")
    out = ident.predict(control, "non-targeting", "B")
    expected = np.clip(control - control.mean(0) + x[ctrl_b].mean(0), 0, None)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    add = fit_baseline("additive", train, GENES, basal="train")
    plain = fit_baseline("additive", train, GENES)
    np.testing.assert_allclose(
        add.predict(control, "G1", "B"), plain.predict(expected, "G1", "B"), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(DataValidationError, match="--basal"):
        fit_baseline("mean", train, GENES, basal="median")


def test_target_effect_scales_each_targets_own_gene_by_the_training_median_ratio():
    train = training_cells()
    x, obs = logx(train), train.obs
    ctrl = (obs.target_gene == "non-targeting").to_numpy()
    ratios = [x[(obs.target_gene == g).to_numpy(), i].mean() / x[ctrl, i].mean()
              for i, g in enumerate(("G0", "G1", "G2", "G3"))]  # fmt: skip
    factor = float(np.median(ratios))
    assert 0.2 < factor < 0.8  # counts were knocked to 0.2x: lower in log1p, not zero
    plain = fit_baseline("mean", train, GENES, cell_type_col=None)
    with_target = fit_baseline("mean", train, GENES, cell_type_col=None, target_effect=True)
    assert with_target.name == "mean+target"
    control = np.abs(np.random.default_rng(1).normal(1, 0.3, (5, len(GENES)))).astype(np.float32)
    a, b = plain.predict(control, "G7", ""), with_target.predict(control, "G7", "")
    np.testing.assert_allclose(b[:, 7], factor * a[:, 7], rtol=1e-5)  # an unseen measured target
    np.testing.assert_array_equal(np.delete(b, 7, axis=1), np.delete(a, 7, axis=1))
    np.testing.assert_array_equal(with_target.predict(control, "non-targeting", ""), control)
    with pytest.raises(DataValidationError, match="target effect"):
        fit_baseline("control", train, GENES, target_effect=True)
    unmeasured = train[~train.obs.target_gene.isin(["G0", "G1", "G2", "G3"])].copy()
    unmeasured.obs["target_gene"] = "non-targeting"
    unmeasured = ad.concat([unmeasured, train[train.obs.target_gene == "G0"]])
    unmeasured.obs["target_gene"] = unmeasured.obs.target_gene.replace("G0", "OTHER")
    with pytest.raises(DataValidationError, match="measured gene"):
        fit_baseline("mean", unmeasured, GENES, cell_type_col=None, target_effect=True)
