"""Baselines on training cells whose answers are computed here independently (NumPy, from the
formulas of the module docstring): control identity, training mean, additive, linear (PCA
ridge), latent arithmetic; composition-matched shifts (within cell type and batch, each
context counted once); the note when two baselines coincide."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.perturbation_baselines import (
    coincidence_note,
    coincident_groups,
    fit_baseline,
)
from latentcell.inference.predict import PopulationRequest, predict_population

GENES = [f"G{i}" for i in range(30)]
CTRL = "non-targeting"


def training_cells(seed: int = 0) -> ad.AnnData:
    """Controls and single perturbations of G0..G3 in two cell types; each perturbation
    multiplies a known block of genes by 3 (and knocks its target down)."""
    rng = np.random.default_rng(seed)
    rows, labels, types = [], [], []
    base = rng.gamma(2.0, 2.0, len(GENES))
    for cell_type, scale in (("T", 1.0), ("B", 1.5)):
        for label in (CTRL, "G0", "G1", "G2", "G3"):
            mu = base * scale
            if label != CTRL:
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
    """log1p(counts / library * 1e4), written here from the definition."""
    counts = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    return np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)


def rows_of(a: ad.AnnData, **where) -> np.ndarray:
    mask = np.ones(a.n_obs, dtype=bool)
    for column, value in where.items():
        mask &= (a.obs[column].astype(str) == value).to_numpy()
    return mask


def matched_delta(x, a, label, cell_type, batch_col="batch") -> np.ndarray:
    """delta_p(t): per batch holding both, mean(perturbed) - mean(controls); equal per batch."""
    deltas = []
    for b in sorted(set(a.obs[batch_col].astype(str))):
        p = rows_of(a, target_gene=label, cell_type=cell_type, **{batch_col: b})
        c = rows_of(a, target_gene=CTRL, cell_type=cell_type, **{batch_col: b})
        if p.any() and c.any():
            deltas.append(x[p].mean(0) - x[c].mean(0))
    return np.mean(deltas, axis=0)


def test_control_identity_and_training_mean_shift():
    train = training_cells()
    x = logx(train)
    control = np.abs(np.random.default_rng(1).normal(1, 0.3, (5, len(GENES)))).astype(np.float32)
    ident = fit_baseline("control", train, GENES)
    np.testing.assert_array_equal(ident.predict(control, "G1", "T"), control)

    mean = fit_baseline("mean", train, GENES)
    ctrl = rows_of(train, target_gene=CTRL, cell_type="T")
    shift = np.mean(
        [x[rows_of(train, target_gene=g, cell_type="T")].mean(0) - x[ctrl].mean(0)
         for g in ("G0", "G1", "G2", "G3")], axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(
        mean.predict(control, "G2", "T"), np.clip(control + shift, 0, None), atol=1e-5
    )
    # the same for every perturbation: that is the baseline
    np.testing.assert_array_equal(
        mean.predict(control, "G0", "T"), mean.predict(control, "G3", "T")
    )


def test_additive_sums_single_gene_shifts_of_the_cell_type():
    train = training_cells()
    x = logx(train)
    add = fit_baseline("additive", train, GENES)
    ctrl = rows_of(train, target_gene=CTRL, cell_type="T")
    d = {g: x[rows_of(train, target_gene=g, cell_type="T")].mean(0) - x[ctrl].mean(0)
         for g in ("G0", "G2")}  # fmt: skip
    zero = np.full((1, len(GENES)), 50.0, dtype=np.float32)  # far from the clip at 0
    np.testing.assert_allclose(add.predict(zero, "G0", "T")[0] - 50, d["G0"], atol=1e-4)
    np.testing.assert_allclose(
        add.predict(zero, "G0+G2", "T")[0] - 50, d["G0"] + d["G2"], atol=1e-4
    )
    with pytest.raises(DataValidationError, match="G7"):
        add.predict(zero, "G0+G7", "T")


def test_linear_model_recovers_seen_effects_and_embeds_measured_genes():
    train = training_cells()
    x = logx(train)
    lin = fit_baseline("linear", train, GENES, n_components=8, ridge=1e-3)
    ctrl = rows_of(train, target_gene=CTRL)
    base = np.full((1, len(GENES)), 50.0, dtype=np.float32)
    for g in ("G0", "G1", "G2", "G3"):
        truth = x[rows_of(train, target_gene=g)].mean(0) - x[ctrl].mean(0)
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
    no_ctrl = train[train.obs.target_gene != CTRL].copy()
    with pytest.raises(DataValidationError, match=CTRL):
        fit_baseline("mean", no_ctrl, GENES)


def test_linear_model_embeds_an_unmeasured_seen_target_by_its_response():
    train = training_cells()
    train.obs["target_gene"] = train.obs["target_gene"].replace({"G3": "NOTGENE"})
    x = logx(train)
    lin = fit_baseline("linear", train, GENES, n_components=8, ridge=1e-3)
    ctrl = rows_of(train, target_gene=CTRL)
    truth = x[rows_of(train, target_gene="NOTGENE")].mean(0) - x[ctrl].mean(0)
    base = np.full((1, len(GENES)), 50.0, dtype=np.float32)
    assert np.corrcoef(truth, lin.predict(base, "NOTGENE", "T")[0] - 50)[0, 1] > 0.8


def test_train_basal_recentres_the_controls_on_the_training_controls():
    """basal='train': the given controls' mean is replaced by the training controls' mean of
    their cell type before the shift, so the prediction's mean no longer follows the
    controls' sample mean; their cell-to-cell deviations are kept. A cell type without
    training controls keeps its own mean (never another type's)."""
    train = training_cells()
    x = logx(train)
    ctrl_b = rows_of(train, target_gene=CTRL, cell_type="B")
    rng = np.random.default_rng(2)
    control = x[ctrl_b][:8] + rng.normal(0, 0.05, (8, len(GENES))) + 0.5
    control = control.astype(np.float32)
    ident = fit_baseline("control", train, GENES, basal="train")
    out = ident.predict(control, CTRL, "B")
    expected = np.clip(control - control.mean(0) + x[ctrl_b].mean(0), 0, None)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ident.predict(control, CTRL, "unseen type"), control)
    add = fit_baseline("additive", train, GENES, basal="train")
    plain = fit_baseline("additive", train, GENES)
    np.testing.assert_allclose(
        add.predict(control, "G1", "B"), plain.predict(expected, "G1", "B"), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(DataValidationError, match="--basal"):
        fit_baseline("mean", train, GENES, basal="median")


def test_target_effect_scales_each_targets_own_gene_by_the_training_median_ratio():
    train = training_cells()
    x = logx(train)
    ctrl = rows_of(train, target_gene=CTRL)
    ratios = [x[rows_of(train, target_gene=g), i].mean() / x[ctrl, i].mean()
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
    np.testing.assert_array_equal(with_target.predict(control, CTRL, ""), control)
    with pytest.raises(DataValidationError, match="target effect"):
        fit_baseline("control", train, GENES, target_effect=True)
    unmeasured = train[~train.obs.target_gene.isin(["G0", "G1", "G2", "G3"])].copy()
    unmeasured.obs["target_gene"] = CTRL
    unmeasured = ad.concat([unmeasured, train[train.obs.target_gene == "G0"]])
    unmeasured.obs["target_gene"] = unmeasured.obs.target_gene.replace("G0", "OTHER")
    with pytest.raises(DataValidationError, match="measured gene"):
        fit_baseline("mean", unmeasured, GENES, cell_type_col=None, target_effect=True)


# ---------------------------------------------------------------- composition matching

N = 40  # genes of the context data
BATCH_GENES = slice(0, 10)  # batch b2 multiplies these by 4
COMMON, SPECIFIC = slice(10, 20), {"T1": slice(20, 25), "T2": slice(25, 30)}


def context_means() -> dict[str, np.ndarray]:
    """Very different cell types (a held-out type's centroid is far from the others')."""
    rng = np.random.default_rng(11)
    return {t: rng.gamma(2.0, 3.0, N) + 1 for t in ("T1", "T2", "T3")}


def context_cells(spec, seed: int) -> ad.AnnData:
    """Poisson counts for ``spec`` = [(cell type, batch, label, n)]: the type's means, times 4
    on BATCH_GENES in batch b2, and for perturbation ``P``: x3 on COMMON genes in every type,
    x1.5 on the type's own SPECIFIC genes (none for T3)."""
    rng = np.random.default_rng(seed)
    means = context_means()
    blocks, obs = [], []
    for cell_type, batch, label, n in spec:
        mu = means[cell_type].copy()
        if batch == "b2":
            mu[BATCH_GENES] *= 4
        if label == "P":
            mu[COMMON] *= 3
            if cell_type in SPECIFIC:
                mu[SPECIFIC[cell_type]] *= 1.5
        blocks.append(rng.poisson(mu * 20, size=(n, N)))
        obs += [(label, cell_type, batch)] * n
    frame = pd.DataFrame(obs, columns=["target_gene", "cell_type", "batch"])
    frame.index = [f"s{seed}c{i}" for i in range(len(frame))]
    return ad.AnnData(
        X=sp.csr_matrix(np.concatenate(blocks).astype(np.float32)),
        obs=frame,
        var=pd.DataFrame(index=[f"G{i}" for i in range(N)]),
    )


# P is measured in T1 (3x the cells of T2) and T2, mostly in batch b2 while the controls are
# split evenly; T3 has controls only (the held-out context).
TRAIN_SPEC = [
    ("T1", "b1", CTRL, 100), ("T1", "b2", CTRL, 100), ("T1", "b1", "P", 30), ("T1", "b2", "P", 270),
    ("T2", "b1", CTRL, 100), ("T2", "b2", CTRL, 100), ("T2", "b1", "P", 10), ("T2", "b2", "P", 90),
    ("T3", "b1", CTRL, 100), ("T3", "b2", CTRL, 100),
]  # fmt: skip
TEST_SPEC = [("T3", b, label, 300) for b in ("b1", "b2") for label in (CTRL, "P")]


def test_shifts_are_matched_within_cell_type_and_batch_and_equal_per_context():
    train = context_cells(TRAIN_SPEC, seed=1)
    x = logx(train)
    genes = list(train.var_names)
    add = fit_baseline("additive", train, genes)
    mean = fit_baseline("mean", train, genes)
    zero = np.full((1, N), 50.0, dtype=np.float32)

    def shift(baseline, cell_type):
        return baseline.predict(zero, "P", cell_type)[0] - 50

    d1, d2 = matched_delta(x, train, "P", "T1"), matched_delta(x, train, "P", "T2")
    np.testing.assert_allclose(shift(add, "T1"), d1, atol=1e-4)  # a seen type: its own delta
    np.testing.assert_allclose(shift(add, "T3"), (d1 + d2) / 2, atol=1e-4)  # held out: mean
    np.testing.assert_allclose(shift(mean, "T3"), (d1 + d2) / 2, atol=1e-4)
    # The unmatched shift (T1's perturbed cells, 90% in b2, against its controls, 50/50) is
    # off by exactly 0.4 x (mean of P in b2 - in b1): the batch effect, about 0.9 in log1p
    # on BATCH_GENES after library normalization, so about 0.36 there; P itself leaves them.
    p, c = (
        rows_of(train, target_gene="P", cell_type="T1"),
        rows_of(train, target_gene=CTRL, cell_type="T1"),
    )
    unmatched = x[p].mean(0) - x[c].mean(0)
    batch_effect = x[p & rows_of(train, batch="b2")].mean(0) - x[
        p & rows_of(train, batch="b1")
    ].mean(0)
    np.testing.assert_allclose(unmatched - shift(add, "T1"), 0.4 * batch_effect, atol=1e-4)
    assert np.all(0.4 * batch_effect[BATCH_GENES] > 0.3), batch_effect
    # matched, BATCH_GENES move like the other genes P leaves (library dilution only)
    assert abs(d1[BATCH_GENES].mean() - d1[30:].mean()) < 0.05
    # equal per context, not per cell: T1 has 3x the perturbed cells of T2
    by_cells = (3 * d1 + d2) / 4
    assert np.abs(shift(add, "T3") - by_cells)[SPECIFIC["T1"]].min() > 0.05
    # no batch column: the same rule within cell types only
    no_batch = fit_baseline("additive", train, genes, batch_col=None)
    np.testing.assert_allclose(shift(no_batch, "T1"), unmatched, atol=1e-4)


class OrthogonalAutoencoder:
    """A linear autoencoder: z = x R, x = z R^T with R orthogonal (the count VAE bridge's
    interface: genes, encode_numpy, decode_numpy, sample). Latent arithmetic through it is
    log1p arithmetic rotated, so its right answer is known exactly."""

    def __init__(self, genes: list[str], seed: int = 0) -> None:
        self._genes = genes
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(genes), len(genes))))
        self.R = q

    def genes(self) -> list[str]:
        return self._genes

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.R

    def decode_numpy(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z) @ self.R.T).astype(np.float32)

    def sample(self, z, library, rng) -> np.ndarray:
        return self.decode_numpy(z)


def test_latent_arithmetic_for_a_held_out_cell_type_against_numpy():
    """P is never seen in T3: the latent shift is the mean over T1 and T2 of their
    batch-matched latent deltas (NumPy below); the old rule (P's cells of T1 and T2 pooled,
    minus T3's controls) moves T3's cells onto the other types' perturbed centroid."""
    train = context_cells(TRAIN_SPEC, seed=1)
    test = context_cells(TEST_SPEC, seed=2)
    genes = list(train.var_names)
    vae = OrthogonalAutoencoder(genes)
    scgen = fit_baseline("latent", train, genes, bridge=vae)
    x, z = logx(train), vae.encode_numpy(logx(train))
    shift = (matched_delta(z, train, "P", "T1") + matched_delta(z, train, "P", "T2")) / 2
    t3 = logx(test)
    controls = t3[rows_of(test, target_gene=CTRL)].astype(np.float32)
    expected = vae.decode_numpy(vae.encode_numpy(controls) + shift)
    np.testing.assert_allclose(scgen.predict(controls, "P", "T3"), expected, atol=1e-4)

    old = z[rows_of(train, target_gene="P")].mean(0) - z[
        rows_of(train, target_gene=CTRL, cell_type="T3")
    ].mean(0)
    truth = t3[rows_of(test, target_gene="P")].mean(0) - controls.mean(0)
    new_shift = scgen.predict(controls, "P", "T3").mean(0) - controls.mean(0)
    old_shift = old @ vae.R.T
    r_new, r_old = np.corrcoef(new_shift, truth)[0, 1], np.corrcoef(old_shift, truth)[0, 1]
    assert r_new > 0.9 and r_old < 0.7, (r_new, r_old)
    # a seen type gets its own delta
    t1 = x[rows_of(train, target_gene=CTRL, cell_type="T1")][:20].astype(np.float32)
    own = matched_delta(z, train, "P", "T1")
    np.testing.assert_allclose(
        scgen.predict(t1, "P", "T1"), vae.decode_numpy(vae.encode_numpy(t1) + own), atol=1e-4
    )
    with pytest.raises(DataValidationError, match="seen in training"):
        scgen.predict(t1, "UNSEEN", "T1")


def test_latent_arithmetic_with_a_real_count_vae(small_store, tmp_path):
    """The same formula through a trained CountVAE (its encoder and decoder, real): one
    perturbation's cells of one cell type are held out of training, and its prediction there
    is decode(encode(control) + mean over the other types of their batch-matched deltas)."""
    from accelerate.state import AcceleratorState, GradientState

    from latentcell.inference.vae_bridge import VAEBridge
    from latentcell.trainer.config import load_config
    from latentcell.trainer.loop import fit
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    config = load_config(VAERunConfig, None, [
        f"data.path={small_store}", f"run.dir={tmp_path / 'vae'}", "model.n_latent=4",
        "model.n_hidden=32", "model.batch_conditioning=false", "train.max_steps=20",
        "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
        "tracking.enabled=false", "data.batch_size=128",
    ])  # fmt: skip
    try:
        fit(VAEStage(config), config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    cells = ad.read_h5ad(small_store.parent / "cells.h5ad")
    types = sorted(set(cells.obs["cell_type"].astype(str)))
    target = sorted(set(cells.obs["target_gene"].astype(str)) - {CTRL})[0]
    held = rows_of(cells, target_gene=target, cell_type=types[0])
    train = cells[~held].copy()
    scgen = fit_baseline("latent", train, [], vae_run=str(tmp_path / "vae"))
    bridge = VAEBridge(tmp_path / "vae")
    z = bridge.encode_numpy(logx(train))
    shift = np.mean([matched_delta(z, train, target, t) for t in types[1:]], axis=0)
    controls = logx(cells[rows_of(cells, target_gene=CTRL, cell_type=types[0])][:16]).astype(
        np.float32
    )
    expected = bridge.decode_numpy(bridge.encode_numpy(controls) + shift)
    np.testing.assert_allclose(
        scgen.predict(controls, target, types[0]), expected, rtol=1e-4, atol=1e-4
    )
    old = z[rows_of(train, target_gene=target)].mean(0) - z[
        rows_of(train, target_gene=CTRL, cell_type=types[0])
    ].mean(0)
    assert np.abs(old - shift).max() > 0.05  # the old rule is a different answer here


# ---------------------------------------------------------------- coincident baselines


def one_perturbation_cells() -> ad.AnnData:
    return context_cells([s for s in TRAIN_SPEC if s[0] != "T3"], seed=3)


def test_one_training_perturbation_makes_mean_additive_and_linear_coincide():
    train = one_perturbation_cells()
    genes = list(train.var_names)
    fitted = {
        n: fit_baseline(n, train, genes, n_components=5)
        for n in ("control", "mean", "additive", "linear")
    }
    assert coincident_groups(fitted, ["P"], ["T1", "T2", "T3"]) == [["mean", "additive", "linear"]]
    several = training_cells()
    fitted = {
        n: fit_baseline(n, several, GENES, n_components=5) for n in ("mean", "additive", "linear")
    }
    assert coincident_groups(fitted, ["G0", "G1"], ["T", "B"]) == []
    # the same shifts with and without the target effect are different predictions
    targeted = fit_baseline("mean", several, GENES, target_effect=True)
    assert coincident_groups({"m": fitted["mean"], "t": targeted}, ["G0"], ["T"]) == []


def test_predict_prints_one_line_when_the_baseline_coincides(tmp_path, capsys):
    from latentcell.launch.cli import main

    train, controls = tmp_path / "train.h5ad", tmp_path / "controls.h5ad"
    cells = one_perturbation_cells()
    cells.write_h5ad(train)
    cells[rows_of(cells, target_gene=CTRL)][:40].copy().write_h5ad(controls)
    argv = ["predict", "--baseline", "mean", "--train", str(train), "--controls", str(controls)]
    argv += ["--perturbations", "all", "--cells-per-perturbation", "5"]
    assert main([*argv, "--out", str(tmp_path / "mean.h5ad")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "same cells as additive, linear" in notes[0], notes

    several = tmp_path / "several.h5ad"
    training_cells().write_h5ad(several)
    controls_b = tmp_path / "controls_b.h5ad"
    training_cells(1)[:60].copy().write_h5ad(controls_b)
    argv = [
        "predict",
        "--baseline",
        "additive",
        "--train",
        str(several),
        "--controls",
        str(controls_b),
    ]
    argv += [
        "--perturbations",
        "G0,G1",
        "--cells-per-perturbation",
        "5",
        "--out",
        str(tmp_path / "a.h5ad"),
    ]
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().out
    # the function itself, on a fitted baseline and a prediction file
    mean = fit_baseline("mean", cells, list(cells.var_names))
    request = PopulationRequest(("P",), 3)
    pred = predict_population(mean, cells[rows_of(cells, target_gene=CTRL)][:10], request, "c")
    assert "additive, linear" in coincidence_note(mean, pred, request)
