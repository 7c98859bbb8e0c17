"""Metrics comparing generated cells with real cells: pure functions on numpy arrays.

Every function takes ``(n_cells, n_features)`` arrays (PCA coordinates or log1p expression;
each docstring says which the protocol passes) and returns plain floats or a dict of floats.
Each docstring states the convention: which direction is better and the value of a perfect
match. Pairwise distances are dense ``n x m`` matrices, so callers keep ``n`` in the low
thousands (the protocol caps every side at ``max_cells_per_condition``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import wasserstein_distance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, silhouette_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

# Squared bandwidths sigma^2 of the RBF kernels exp(-|x - y|^2 / (2 sigma^2)), in PCA-50
# units of log1p(normalize_total 1e4) data. Why these: measured on Paul 2015 (2000 HVGs,
# PCA-50), the squared distance between two cells has median 786 (1st percentile 124), and to a
# cell's 5th nearest neighbour median 160; deeper or cleaner data sit lower. The list spans
# sigma^2 = 10 (local shape) to 2000 (shifts of whole populations) geometrically, so the mean
# kernel is sensitive at every scale in between without being tuned on the data being judged.
MMD_BANDWIDTHS: tuple[float, ...] = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; nan when either side is constant (r is undefined there)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def _r2(target: np.ndarray, prediction: np.ndarray) -> float:
    """1 - SS_res / SS_tot of ``prediction`` for ``target``; nan when target is constant."""
    ss_tot = float(((target - target.mean()) ** 2).sum())
    ss_res = float(((target - prediction) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> float:
    """Unbiased squared MMD with the MEAN of RBF kernels over a fixed list of sigma^2.

    ``k(a, b) = mean_s exp(-|a - b|^2 / (2 s))`` for ``s`` in ``bandwidths`` (squared
    bandwidths, see ``MMD_BANDWIDTHS``). The U-statistic drops the diagonals of the within-set
    kernel matrices, so two samples of one distribution score 0 in expectation and can go
    slightly negative. Lower is better; 0 is a perfect match. Needs at least 2 cells per side.
    """
    x, y = _as_2d(x), _as_2d(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 cells on each side")
    dxx, dyy, dxy = (cdist(a, b, "sqeuclidean") for a, b in ((x, x), (y, y), (x, y)))
    total = 0.0
    for s in bandwidths:
        kxx, kyy, kxy = (np.exp(-d / (2.0 * s)) for d in (dxx, dyy, dxy))
        total += (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        total += (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total -= 2.0 * kxy.mean()
    return float(total / len(bandwidths))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic, not square-rooted).

    The V-statistic averages over all pairs including ``X = X'``, so it is never negative and
    is exactly 0 for identical sets. Euclidean norms. Lower is better; 0 is a perfect match.
    """
    x, y = _as_2d(x), _as_2d(y)
    exy = cdist(x, y).mean()
    exx = cdist(x, x).mean()
    eyy = cdist(y, y).mean()
    return float(2.0 * exy - exx - eyy)


def wasserstein(x: np.ndarray, y: np.ndarray, exact_max: int = 5000, p: int = 2) -> float:
    """Wasserstein-p distance between two equal-size empirical distributions (W2 by default).

    Euclidean ground metric; returns ``(min over matchings of mean |x_i - y_pi(i)|^p)^(1/p)``.
    With ``n <= exact_max`` cells the optimal matching is exact (``linear_sum_assignment``:
    with equal uniform weights an optimal plan is a permutation). Above it, a log-domain
    Sinkhorn with epsilon scaling (``_sinkhorn_cost``) approximates it (within 0.1% of the
    exact value on 100-300 Gaussian cells; tested within 1%); it costs O(n^2) memory and time
    per iteration. Why no POT: a compiled dependency for one ~20-line fallback that the protocol
    never reaches (it caps cells at 2000 per side). Lower is better; 0 is a perfect match.
    """
    x, y = _as_2d(x), _as_2d(y)
    if len(x) != len(y):
        raise ValueError(f"wasserstein needs equal sample sizes, got {len(x)} and {len(y)}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    cost = cdist(x, y, "sqeuclidean" if p == 2 else "euclidean")
    if len(x) <= exact_max:
        rows, cols = linear_sum_assignment(cost)
        mean_cost = float(cost[rows, cols].mean())
    else:
        mean_cost = _sinkhorn_cost(cost)
    return float(max(mean_cost, 0.0) ** (1.0 / p))


def _sinkhorn_cost(
    cost: np.ndarray, eps_rel: float = 1e-3, scaling: float = 0.5, inner: int = 20
) -> float:
    """Transport cost ``<P, C>`` of the entropic plan between uniform weights.

    Log-domain updates of the dual potentials (stable for small epsilon); epsilon starts at the
    largest cost and shrinks by ``scaling`` until ``eps_rel * mean(C)``, with ``inner``
    alternating updates at each value, warm-started. Memory and time O(n * m) per update.
    """
    n, m = cost.shape
    log_a, log_b = -np.log(n), -np.log(m)
    f, g = np.zeros(n), np.zeros(m)
    eps_final = max(eps_rel * float(cost.mean()), 1e-12)
    eps = max(float(cost.max()), eps_final)
    while True:
        for _ in range(inner):
            f = -eps * logsumexp((g[None, :] - cost) / eps + log_b, axis=1)
            g = -eps * logsumexp((f[:, None] - cost) / eps + log_a, axis=0)
        if eps <= eps_final:
            break
        eps = max(eps * scaling, eps_final)
    plan = np.exp((f[:, None] + g[None, :] - cost) / eps + log_a + log_b)
    return float((plan * cost).sum() / plan.sum())


def knn_auc(
    real: np.ndarray,
    generated: np.ndarray,
    k: int = 5,
    seed: int = 0,
    test_fraction: float = 0.5,
) -> float:
    """ROC AUC of a k-NN classifier telling generated (1) from real (0) on held-out cells.

    Cells are split (stratified, seeded) into a fit part and a held-out ``test_fraction``; the
    k-NN classifier fitted on the first scores P(generated) on the second. 0.5 means the sets
    are indistinguishable (perfect); 1.0 means fully separable. Values below 0.5 are noise.
    """
    real, generated = _as_2d(real), _as_2d(generated)
    features = np.concatenate([real, generated])
    labels = np.concatenate([np.zeros(len(real), int), np.ones(len(generated), int)])
    fit_x, test_x, fit_y, test_y = train_test_split(
        features, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    model = KNeighborsClassifier(n_neighbors=min(k, len(fit_x))).fit(fit_x, fit_y)
    return float(roc_auc_score(test_y, model.predict_proba(test_x)[:, 1]))


def distance_to_training_ratio(
    train: np.ndarray, reference: np.ndarray, generated: np.ndarray
) -> float:
    """Memorization check (distance to closest record, DCR): the median distance from each
    generated cell to its nearest TRAINING cell, divided by the same median for held-out real
    cells (PCA coordinates). About 1: generated cells are no closer to the training cells
    than new real cells are; well below 1: the model copies training cells, and a close match
    to held-out cells (kNN AUC) may be memorization; above 1: cells off the training data.
    """
    nearest = NearestNeighbors(n_neighbors=1).fit(_as_2d(train))
    generated_d = nearest.kneighbors(_as_2d(generated))[0][:, 0]
    reference_d = nearest.kneighbors(_as_2d(reference))[0][:, 0]
    return float(np.median(generated_d) / max(np.median(reference_d), 1e-12))


def latent_nn_ratio(train: np.ndarray, generated: np.ndarray) -> float:
    """Memorization check in the latent a generator samples: the median distance from each
    generated latent to its nearest training latent, over the median leave-one-out
    nearest-neighbour distance among the training latents themselves.

    A fresh draw from the training distribution scores about 1; near-copies of training
    latents score well below 1 (0 for exact copies). In count space (``
    distance_to_training_ratio``) the decoder's sampling noise hides copying: a DiT whose
    latents sat at 0.15 here scored 1.05 there.
    """
    train = _as_2d(train)
    nearest = NearestNeighbors(n_neighbors=min(2, len(train))).fit(train)
    loo = nearest.kneighbors(train)[0][:, -1]
    generated_d = nearest.kneighbors(_as_2d(generated), n_neighbors=1)[0][:, 0]
    return float(np.median(generated_d) / max(np.median(loo), 1e-12))


def _kth_neighbour_radius(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    k = min(k, len(points) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return dist[:, k]


def prdc(real: np.ndarray, generated: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-NN balls.

    Each real cell gets a ball reaching its k-th real neighbour (generated cells likewise).
    - precision: fraction of generated cells inside some real ball (fidelity);
    - recall: fraction of real cells inside some generated ball (diversity);
    - density: mean number of real balls holding a generated cell, divided by k (about 1 for
      a perfect match; above 1 when generated cells crowd dense real regions);
    - coverage: fraction of real cells whose ball holds at least one generated cell.
    Higher is better for all; precision, recall and coverage are at most 1 (perfect).
    """
    real, generated = _as_2d(real), _as_2d(generated)
    real_radius = _kth_neighbour_radius(real, k)
    gen_radius = _kth_neighbour_radius(generated, k)
    dist = cdist(real, generated)
    in_real_ball = dist < real_radius[:, None]
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": float((dist < gen_radius[None, :]).any(axis=1).mean()),
        "density": float(in_real_ball.sum() / (k * len(generated))),
        "coverage": float(in_real_ball.any(axis=1).mean()),
    }


def gene_mean_var_agreement(real_expr: np.ndarray, gen_expr: np.ndarray) -> dict[str, float]:
    """Agreement of per-gene means and variances (cells x genes expression, e.g. log1p).

    ``*_pearson``: Pearson r across genes (higher better, 1 perfect). ``*_r2``: coefficient of
    determination of the generated statistic predicting the real one, ``1 - SS_res / SS_tot``
    (higher better, 1 perfect, unbounded below). Means of all genes agree well even for weak
    models (an average cell scores near 1), so read them together with the distances.
    """
    real_expr, gen_expr = _as_2d(real_expr), _as_2d(gen_expr)
    out = {}
    for name, stat in (("mean", np.mean), ("var", np.var)):
        r, g = stat(real_expr, axis=0), stat(gen_expr, axis=0)
        out[f"{name}_pearson"] = _pearson(r, g)
        out[f"{name}_r2"] = _r2(r, g)
    return out


def zero_fraction_agreement(real_counts: np.ndarray, gen_counts: np.ndarray) -> dict[str, float]:
    """Per-gene fraction of zero entries, real against generated (cells x genes).

    ``zero_frac_mae``: mean over genes of |difference| (lower better, 0 perfect);
    ``zero_frac_pearson``: Pearson r across genes (higher better, 1 perfect);
    ``sparsity_real`` / ``sparsity_generated``: overall fraction of zeros (should match).
    Zeros are the same before and after normalize_total + log1p, so either may be passed.
    """
    real_zero = _as_2d(real_counts) == 0
    gen_zero = _as_2d(gen_counts) == 0
    real_frac, gen_frac = real_zero.mean(axis=0), gen_zero.mean(axis=0)
    return {
        "zero_frac_mae": float(np.abs(real_frac - gen_frac).mean()),
        "zero_frac_pearson": _pearson(real_frac, gen_frac),
        "sparsity_real": float(real_zero.mean()),
        "sparsity_generated": float(gen_zero.mean()),
    }


def per_gene_wasserstein(real_expr: np.ndarray, gen_expr: np.ndarray) -> float:
    """Mean over genes of the 1-D Wasserstein-1 distance between real and generated values.

    Same result as ``scipy.stats.wasserstein_distance`` per gene; for equal sample sizes it is
    computed at once as the mean |difference| of the sorted columns (the 1-D optimal matching),
    which is much faster than one scipy call per gene. Lower is better; 0 is perfect.
    """
    real_expr, gen_expr = _as_2d(real_expr), _as_2d(gen_expr)
    if len(real_expr) == len(gen_expr):
        diff = np.sort(real_expr, axis=0) - np.sort(gen_expr, axis=0)
        return float(np.abs(diff).mean())
    per_gene = [
        wasserstein_distance(real_expr[:, j], gen_expr[:, j]) for j in range(real_expr.shape[1])
    ]
    return float(np.mean(per_gene))


def silhouette_by_condition(
    x: np.ndarray, labels: np.ndarray, sample_size: int | None = None, seed: int = 0
) -> float:
    """Mean silhouette width of the condition labels in ``x`` (Euclidean; sklearn).

    In [-1, 1]: near 1 when conditions form separate clusters, near 0 when they overlap. Not a
    better/worse score on its own: a generated set should match the real set's value. nan
    with fewer than 2 labels (or fewer cells than labels + 1). ``sample_size`` caps the cells
    used (seeded), since the cost is quadratic.
    """
    x, labels = _as_2d(x), np.asarray(labels)
    n_labels = len(np.unique(labels))
    if n_labels < 2 or len(x) <= n_labels:
        return float("nan")
    if sample_size is not None and sample_size >= len(x):
        sample_size = None
    return float(silhouette_score(x, labels, sample_size=sample_size, random_state=seed))


def fit_condition_classifier(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> Pipeline:
    """Standardised features, then multinomial logistic regression (lbfgs, max_iter 1000)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    return model.fit(_as_2d(train_x), np.asarray(train_y))


def accuracy(model: Pipeline, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Fraction of ``test_x`` whose predicted label equals ``test_y``."""
    return float((model.predict(_as_2d(test_x)) == np.asarray(test_y)).mean())


def classifier_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
) -> float:
    """Accuracy on ``test`` of a condition classifier trained on real cells (PCA features).

    The classifier is ``fit_condition_classifier`` (seeded, deterministic). Higher is better; a
    generated set is perfect when it scores as well as held-out real cells do (the protocol
    reports both; it fits once and scores every set with ``accuracy``, which is the same
    number). Test labels never seen in training count as errors.
    """
    return accuracy(fit_condition_classifier(train_x, train_y, seed), test_x, test_y)
