"""The seed designs' scoreboards on data whose answers are known, and against independent code."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.metrics import r2_score

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation import scoreboards as sb
from latentcell.evaluation.scoreboard_figure import (
    draw_scoreboard,
    jaccard_by_k,
    write_scoreboard_figure,
)

N_GENES, N_CELLS, PERTS = 200, 60, ("pA", "pB", "pC", "pD")


def _sets_jaccard(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Top-k by |delta| with Python sets; ties to the lower gene index."""

    def top(d):
        return set(sorted(range(len(d)), key=lambda g: (-abs(d[g]), g))[: min(k, len(d))])

    p, t = top(pred), top(true)
    return len(p & t) / len(p | t)


def _brute_purity(pred, pred_labels, real, real_labels, k) -> float:
    order = np.argsort(cdist(pred, real), axis=1, kind="stable")[:, : min(k, len(real))]
    return float((np.asarray(real_labels)[order] == np.asarray(pred_labels)[:, None]).mean())


# ---------------------------------------------------------------- seed 003: gene space


def test_identical_and_reversed_shifts():
    delta = np.random.default_rng(0).normal(size=N_GENES)
    assert sb.mean_shift_pearson(delta, delta) == pytest.approx(1.0)
    assert sb.mean_shift_pearson(-delta, delta) == pytest.approx(-1.0)
    for k in sb.JACCARD_KS:
        assert sb.top_k_jaccard(delta, delta, k) == 1.0
        assert sb.top_k_jaccard(-delta, delta, k) == 1.0  # |shift| ranks: the sign is not seen
    assert np.isnan(sb.mean_shift_pearson(np.zeros(N_GENES), delta))  # r undefined


def test_top25_sets_sharing_ten_genes():
    true, pred = np.zeros(N_GENES), np.zeros(N_GENES)
    true[:25] = np.linspace(5.0, 1.0, 25)
    shared, own = np.arange(15, 25), np.arange(100, 115)
    pred[shared] = -3.0  # large in |shift|
    pred[own] = np.linspace(2.0, 1.5, 15)
    assert sb.top_k_jaccard(pred, true, 25) == pytest.approx(10 / 40)


def test_k_is_clipped_and_ties_go_to_the_lower_gene():
    delta = np.array([0.0, 1.0, -1.0, 1.0, 0.5])
    assert list(sb.top_k_genes(delta, 2)) == [1, 2]
    assert list(sb.top_k_genes(np.zeros(4), 3)) == [0, 1, 2]
    assert sb.top_k_jaccard(delta, -delta[::-1], 100) == 1.0  # K >= genes: every gene
    with pytest.raises(ValueError):
        sb.top_k_jaccard(delta, delta, 0)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_jaccard_matches_python_sets(seed):
    rng = np.random.default_rng(seed)
    pred, true = rng.normal(size=300), rng.normal(size=300)
    pred[::7] = np.round(pred[::7], 1)  # some ties in |shift|
    true[::5] = 1.0
    for k in (1, 25, 50, 100, 299, 400):
        assert sb.top_k_jaccard(pred, true, k) == pytest.approx(_sets_jaccard(pred, true, k))


# ---------------------------------------------------------------- seed 004: embedding


def test_embedding_r2_exact_mean_and_constant_predictions():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(6, 10)) + rng.normal(size=10)
    assert sb.embedding_r2(true, true) == pytest.approx(1.0)
    global_mean = np.broadcast_to(true.mean(axis=0), true.shape)
    assert sb.embedding_r2(global_mean, true) == pytest.approx(0.0, abs=1e-12)
    constant = np.broadcast_to(rng.normal(size=10), true.shape)
    assert sb.embedding_r2(constant, true) < 0
    pred = true + rng.normal(scale=0.5, size=true.shape)
    reference = r2_score(true, pred, multioutput="variance_weighted")
    assert sb.embedding_r2(pred, true) == pytest.approx(reference)
    assert np.isnan(sb.embedding_r2(true[:1], true[:1]))  # one perturbation: undefined


def test_embedding_mse():
    assert sb.embedding_mse(np.array([1.0, 2.0]), np.array([0.0, 0.0])) == pytest.approx(2.5)
    assert sb.embedding_mse(np.ones((3, 4)), np.ones((3, 4))) == 0.0


def _clouds(centres: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(size=(n, centres.shape[1])) for c in centres])
    return x, np.repeat([f"p{i}" for i in range(len(centres))], n)


def test_knn_purity_separated_and_identical_clouds():
    centres = np.eye(4, 5) * 50.0
    real, real_labels = _clouds(centres, 80, seed=0)
    pred, pred_labels = _clouds(centres, 40, seed=1)
    for k in sb.PURITY_KS:
        assert sb.knn_purity(pred, pred_labels, real, real_labels, k) == 1.0
    same = np.zeros_like(centres)  # four labels on one cloud: chance level
    real, real_labels = _clouds(same, 200, seed=2)
    pred, pred_labels = _clouds(same, 100, seed=3)
    assert sb.knn_purity(pred, pred_labels, real, real_labels, 20) == pytest.approx(0.25, abs=0.04)


def test_knn_purity_matches_brute_force_and_clips_k():
    rng = np.random.default_rng(4)
    real, pred = rng.normal(size=(50, 3)), rng.normal(size=(30, 3))
    real_labels, pred_labels = rng.choice(["a", "b", "c"], 50), rng.choice(["a", "b", "c"], 30)
    for k in (1, 10, 50, 80):
        expected = _brute_purity(pred, pred_labels, real, real_labels, k)
        assert sb.knn_purity(pred, pred_labels, real, real_labels, k) == pytest.approx(expected)
    share = np.mean([np.mean(real_labels == lab) for lab in pred_labels])  # k > 50: every cell
    assert sb.knn_purity(pred, pred_labels, real, real_labels, 80) == pytest.approx(share)


# ---------------------------------------------------------------- the whole scoreboard


def _log1p_like(seed: int, perts=PERTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Perturbed cells (each perturbation shifts its own 20 genes) and control cells."""
    shift_rng, rng = np.random.default_rng(99), np.random.default_rng(seed)
    base = 2.0 + shift_rng.gamma(2.0, 0.5, N_GENES)
    blocks = []
    for _ in perts:
        shift = np.zeros(N_GENES)
        shift[shift_rng.permutation(N_GENES)[:20]] = shift_rng.choice([-1.5, 1.5], 20)
        blocks.append(base + shift + rng.normal(scale=0.3, size=(N_CELLS, N_GENES)))
    control = base + rng.normal(scale=0.3, size=(N_CELLS, N_GENES))
    return np.concatenate(blocks), np.repeat(perts, N_CELLS), control


@pytest.fixture(scope="module")
def cells():
    real_x, labels, control = _log1p_like(seed=1)
    pred_x, _, _ = _log1p_like(seed=2)
    return real_x, labels, control, pred_x


def test_scoreboard_of_the_real_cells_themselves(cells):
    real_x, labels, control, _ = cells
    board = sb.perturbation_scoreboard(real_x, labels, real_x, labels, control)
    mean = board["mean"]
    assert mean["mean_shift_pearson"] == pytest.approx(1.0)
    for k in sb.JACCARD_KS:
        assert mean[f"jaccard_top{k}"] == 1.0
    assert mean["embedding_r2"] == pytest.approx(1.0)
    assert mean["embedding_mse"] == pytest.approx(0.0, abs=1e-20)
    assert mean["embedding_energy_distance"] == pytest.approx(0.0, abs=1e-9)
    assert mean["knn_purity_k10"] == 1.0  # the clouds are apart (20 genes moved by 1.5)
    assert set(board["per_perturbation"]) == set(PERTS) and board["degenerate"] == {}
    assert board["embedding"].startswith("PCA-50")


def test_fresh_draw_beats_the_mean_and_sparse_input_agrees(cells):
    real_x, labels, control, pred_x = cells
    model = sb.perturbation_scoreboard(pred_x, labels, real_x, labels, control)["mean"]
    mean_cells = np.broadcast_to(real_x.mean(axis=0), real_x.shape)  # same for every pert
    base = sb.perturbation_scoreboard(mean_cells, labels, real_x, labels, control)["mean"]
    assert model["mean_shift_pearson"] > 0.9 > base["mean_shift_pearson"]
    assert model["jaccard_top25"] > base["jaccard_top25"]
    assert model["embedding_r2"] > 0.9 and base["embedding_r2"] <= 1e-9
    assert model["knn_purity_k20"] > 0.9 and base["knn_purity_k20"] < 0.5
    assert model["embedding_energy_distance"] < base["embedding_energy_distance"]
    sparse = sb.perturbation_scoreboard(
        sp.csr_matrix(pred_x), labels, sp.csr_matrix(real_x), labels, sp.csr_matrix(control)
    )["mean"]
    for key, value in model.items():
        assert sparse[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_callers_embedding_and_a_wrong_one(cells):
    real_x, labels, control, pred_x = cells
    board = sb.perturbation_scoreboard(
        pred_x, labels, real_x, labels, control, embed=lambda x: x[:, :5]
    )
    assert board["embedding"] == "caller's embedding of log1p expression"
    assert 0 <= board["mean"]["embedding_mse"] < 0.05
    with pytest.raises(DataValidationError) as err:
        sb.perturbation_scoreboard(pred_x, labels, real_x, labels, control, embed=lambda x: x[:3])
    assert err.value.path == "embed" and "(n_cells, d)" in err.value.fix


def test_one_perturbation_is_degenerate_in_embedding_space(cells):
    real_x, labels, control, pred_x = cells
    keep = labels == "pA"
    board = sb.perturbation_scoreboard(
        pred_x[keep], labels[keep], real_x[keep], labels[keep], control
    )
    assert board["mean"]["embedding_r2"] is None and board["mean"]["knn_purity_k10"] is None
    assert "one perturbation" in board["degenerate"]["knn_purity_k10"]
    assert board["mean"]["mean_shift_pearson"] > 0.9
    with pytest.raises(ValueError, match="same perturbations"):
        sb.perturbation_scoreboard(pred_x[keep], labels[keep], real_x, labels, control)


# ---------------------------------------------------------------- the figure


def test_figure_has_three_panels_and_is_a_png(cells, tmp_path):
    real_x, labels, control, pred_x = cells
    board = sb.perturbation_scoreboard(pred_x, labels, real_x, labels, control)
    delta = np.random.default_rng(0).normal(size=(2, 30))
    fig = draw_scoreboard(
        delta, delta, ["a", "b"], {25: [0.5, 1.0], 50: [0.2, 0.4]}, delta[:, :2], delta[:, :2]
    )
    assert len(fig.axes) == 3
    assert "pooled r = 1.000" in fig.axes[0].get_title()
    assert sorted(jaccard_by_k(board)) == list(sb.JACCARD_KS)
    path = write_scoreboard_figure(
        tmp_path / "figures" / "s.png", pred_x, labels, real_x, labels, control, board, board
    )
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["s.png"]  # no temporary file left
