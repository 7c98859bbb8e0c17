"""Set losses checked against answers known independently of the code under test.

References: NumPy/SciPy sums over ``cdist`` matrices (energy, MMD), ``scipy.stats``'s 1-D
energy distance, exact optimal transport from ``linear_sum_assignment`` (the Sinkhorn limit
blur -> 0), and closed forms: a translated set has Sinkhorn divergence ``|d|^2 / 2`` at every
blur, with gradient ``-d / n`` on each predicted cell.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from latentcell.models.set_losses import (
    SET_MMD_BANDWIDTHS,
    SetLossConfig,
    energy_distance,
    mean_delta_loss,
    mmd_rbf,
    set_loss,
    sinkhorn_divergence,
)

F64 = torch.float64


def _sets(seed: int, b: int, n: int, g: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, g, generator=gen, dtype=F64) + shift


def _energy_ref(x: np.ndarray, y: np.ndarray) -> float:
    return 2.0 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()


def _mmd_ref(x: np.ndarray, y: np.ndarray, bandwidths) -> float:
    def k(u, v):
        d2 = cdist(u, v, "sqeuclidean")
        return np.mean([np.exp(-d2 / (2.0 * s)) for s in bandwidths], axis=0)

    return k(x, x).mean() + k(y, y).mean() - 2.0 * k(x, y).mean()


def _ot_ref(x: np.ndarray, y: np.ndarray) -> float:
    """Exact OT with cost |x - y|^2 / 2 between equal-size uniform sets (a permutation)."""
    cost = cdist(x, y, "sqeuclidean") / 2.0
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _padded(x: torch.Tensor, valid: list[np.ndarray], size: int, seed: int):
    """Scatter each set's cells into ``size`` slots at random positions; NaN in the padding."""
    rng = np.random.default_rng(seed)
    out = torch.full((x.shape[0], size, x.shape[2]), float("nan"), dtype=x.dtype)
    mask = torch.zeros(x.shape[0], size, dtype=torch.bool)
    for i, n in enumerate(valid):
        slots = torch.as_tensor(np.sort(rng.choice(size, n, replace=False)))
        out[i, slots] = x[i, :n]
        mask[i, slots] = True
    return out, mask


# ---------------------------------------------------------------- energy distance


def test_energy_matches_cdist_reference():
    x, y = _sets(0, 3, 7, 4), _sets(1, 3, 5, 4, shift=0.3)
    got = energy_distance(x, y)
    ref = [_energy_ref(x[i].numpy(), y[i].numpy()) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    # float32 computes the same value to float32 accuracy.
    np.testing.assert_allclose(energy_distance(x.float(), y.float()).numpy(), ref, rtol=1e-4)


def test_energy_masked_equals_valid_subset():
    x, y = _sets(2, 3, 7, 4), _sets(3, 3, 6, 4, shift=0.5)
    n_pred, n_target = [7, 3, 1], [2, 6, 4]
    xp, mx = _padded(x, n_pred, 9, seed=0)
    yp, my = _padded(y, n_target, 8, seed=1)
    got = energy_distance(xp, yp, mx, my)
    for i in range(3):
        xi, yi = x[i, : n_pred[i]], y[i, : n_target[i]]
        ref = _energy_ref(xi.numpy(), yi.numpy())
        assert got[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
        assert got[i].item() == pytest.approx(energy_distance(xi[None], yi[None]).item(), abs=1e-12)


def test_energy_zero_for_identical_and_grows_with_shift():
    x = _sets(4, 2, 10, 3)
    assert torch.equal(energy_distance(x, x.clone()), torch.zeros(2, dtype=F64))
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    values = [energy_distance(x, x + t * direction) for t in (0.05, 0.2, 0.5, 1.0, 3.0)]
    assert values[0].min() > 0
    for small, large in zip(values, values[1:], strict=False):
        assert bool((large > small).all())


def test_energy_1d_is_square_of_scipy():
    # scipy.stats.energy_distance(u, v) = sqrt(2) * (int (F_u - F_v)^2)^(1/2)
    #   = sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|) for the empirical distributions (V-statistic),
    # i.e. the square root of our statistic: ours == scipy ** 2.
    rng = np.random.default_rng(0)
    for n, m, shift in ((9, 6, 0.4), (20, 20, 0.0), (5, 12, -2.0)):
        u, v = rng.normal(size=n), rng.normal(size=m) + shift
        ours = energy_distance(torch.tensor(u)[None, :, None], torch.tensor(v)[None, :, None])
        assert ours.item() == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-10)


def test_empty_set_scores_zero():
    x, y = _sets(5, 2, 4, 3), _sets(6, 2, 4, 3, shift=1.0)
    mask = torch.tensor([[False] * 4, [True] * 4])
    for fn in (energy_distance, mmd_rbf, sinkhorn_divergence, mean_delta_loss):
        got = fn(x, y, mask_pred=mask)
        assert got[0].item() == 0.0 and got[1].item() > 0.0 and bool(torch.isfinite(got).all())


# ---------------------------------------------------------------- MMD


@pytest.mark.parametrize("bandwidths", [(0.5, 2.0, 8.0), SET_MMD_BANDWIDTHS])
def test_mmd_matches_numpy_reference(bandwidths):
    x, y = _sets(7, 3, 6, 5), _sets(8, 3, 8, 5, shift=0.7)
    got = mmd_rbf(x, y, bandwidths=bandwidths)
    ref = [_mmd_ref(x[i].numpy(), y[i].numpy(), bandwidths) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-14)


def test_mmd_masked_and_identical():
    x, y = _sets(9, 2, 6, 3), _sets(10, 2, 5, 3, shift=0.4)
    xp, mx = _padded(x, [6, 2], 8, seed=2)
    yp, my = _padded(y, [3, 5], 7, seed=3)
    got = mmd_rbf(xp, yp, mx, my, bandwidths=(1.0, 4.0))
    for i, (n, m) in enumerate(((6, 3), (2, 5))):
        ref = _mmd_ref(x[i, :n].numpy(), y[i, :m].numpy(), (1.0, 4.0))
        assert got[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-14)
    assert torch.equal(mmd_rbf(x, x.clone()), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(x, y, bandwidths=())


# ---------------------------------------------------------------- Sinkhorn divergence


def test_sinkhorn_zero_for_identical_sets():
    x = _sets(11, 3, 9, 4)
    assert sinkhorn_divergence(x, x.clone()).abs().max().item() < 1e-12
    assert sinkhorn_divergence(x.float(), x.float()).abs().max().item() < 1e-6


def test_sinkhorn_point_masses_and_translation_give_half_squared_shift():
    # One point each: the only plan moves x onto y, so S = |x - y|^2 / 2 = 12.5 at any blur.
    p, q = torch.zeros(1, 1, 2, dtype=F64), torch.tensor([[[3.0, 4.0]]], dtype=F64)
    for blur in (1.0, 0.05, 1e-3):
        assert sinkhorn_divergence(p, q, blur=blur).item() == pytest.approx(12.5, rel=1e-12)
    # A set and its translate: the cost's cross term is separable and cancels under the
    # marginals, so S = |d|^2 / 2 exactly at every blur once the iterations have converged
    # (100 extra: rel. error < 1e-7 observed); the default schedule is within 1e-4 here.
    x = _sets(12, 3, 8, 2)
    d = torch.tensor([0.7, -1.2], dtype=F64)
    for blur in (1.0, 0.1, 0.01):
        got = sinkhorn_divergence(x, x + d, blur=blur, n_iters=100)
        np.testing.assert_allclose(got.numpy(), 0.5 * float(d @ d), rtol=1e-6)
        got = sinkhorn_divergence(x, x + d, blur=blur)
        np.testing.assert_allclose(got.numpy(), 0.5 * float(d @ d), rtol=1e-4)


def test_sinkhorn_converges_to_exact_ot_as_blur_shrinks():
    # Equal-size uniform sets: OT = min over permutations (linear_sum_assignment). With the
    # iterations run to convergence (scaling 0.95, 500 extra), the error vs exact OT shrinks
    # with blur and is below 1e-4 at blur 0.01 (observed: 1.2e-2, 5e-4, 2e-6, 4e-16).
    x, y = _sets(13, 3, 8, 2), _sets(14, 3, 8, 2, shift=1.0)
    ot = np.array([_ot_ref(x[i].numpy(), y[i].numpy()) for i in range(3)])
    errors = []
    for blur in (0.3, 0.1, 0.03, 0.01):
        got = sinkhorn_divergence(x, y, blur=blur, scaling=0.95, n_iters=500).numpy()
        errors.append(np.abs(got - ot).max())
    assert all(large > small for large, small in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-4
    # The default (geomloss) schedule is coarser: within 5% of OT here (observed 4%).
    np.testing.assert_allclose(sinkhorn_divergence(x, y, blur=0.01).numpy(), ot, rtol=0.05)


def test_sinkhorn_symmetric_and_masked_points_ignored():
    x, y = _sets(15, 3, 7, 3), _sets(16, 3, 5, 3, shift=0.5)
    np.testing.assert_allclose(
        sinkhorn_divergence(x, y).numpy(), sinkhorn_divergence(y, x).numpy(), rtol=1e-10
    )
    n_pred, n_target = [7, 4, 2], [5, 1, 3]
    xp, mx = _padded(x, n_pred, 10, seed=4)
    yp, my = _padded(y, n_target, 6, seed=5)
    got = sinkhorn_divergence(xp, yp, mx, my)
    assert bool(torch.isfinite(got).all())
    for i in range(3):
        alone = sinkhorn_divergence(x[i : i + 1, : n_pred[i]], y[i : i + 1, : n_target[i]])
        assert got[i].item() == pytest.approx(alone.item(), rel=1e-9, abs=1e-12)


def test_sinkhorn_gradient_closed_form_and_finite_differences():
    # Translate by d: S = |d|^2 / 2, so dS/dx_i = -d / n and dS/dy_j = +d / m, exactly.
    x = _sets(17, 2, 8, 3)
    d = torch.tensor([0.7, -1.2, 0.3], dtype=F64)
    xr, yr = x.clone().requires_grad_(True), (x + d).requires_grad_(True)
    sinkhorn_divergence(xr, yr, blur=0.1).sum().backward()
    torch.testing.assert_close(xr.grad, (-d / 8).expand_as(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(yr.grad, (d / 8).expand_as(x), rtol=0, atol=1e-9)
    # At convergence the envelope gradient equals the derivative of the value.
    x, y = _sets(18, 1, 4, 2), _sets(19, 1, 5, 2)
    kw = {"blur": 1.0, "scaling": 0.9, "n_iters": 100, "diameter": 10.0}
    xr = x.clone().requires_grad_(True)
    sinkhorn_divergence(xr, y, **kw).sum().backward()
    numeric = torch.zeros_like(x)
    for k in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=F64)
        e[k] = 1e-6
        e = e.view_as(x)
        up, down = sinkhorn_divergence(x + e, y, **kw), sinkhorn_divergence(x - e, y, **kw)
        numeric.view(-1)[k] = (up - down).sum() / 2e-6
    torch.testing.assert_close(xr.grad, numeric, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- gradients, all kinds


@pytest.mark.parametrize("kind", ["energy", "mmd", "sinkhorn"])
def test_gradients_finite_with_coincident_and_padded_points(kind):
    y = _sets(20, 2, 6, 4).float()
    x = y[:, [0, 0, 1, 1, 2, 3, 3]].clone()  # duplicated cells, each equal to a target cell
    x[1] = 0.0  # one set collapsed onto a single point
    x = torch.cat([x, torch.full((2, 2, 4), float("nan"))], dim=1)  # NaN padding
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 7:] = False
    x.requires_grad_(True)
    cfg = SetLossConfig(kind=kind)
    out = set_loss(cfg, x, y, mask_pred=mask)
    out["total"].mean().backward()
    assert bool(torch.isfinite(out["total"]).all()) and bool(torch.isfinite(x.grad).all())
    assert x.grad[:, 7:].abs().max().item() == 0.0  # padded cells get no gradient
    assert x.grad[:, :7].abs().max().item() > 0.0


def test_energy_and_mmd_gradcheck():
    x = _sets(21, 2, 4, 3).requires_grad_(True)
    y = _sets(22, 2, 5, 3, shift=0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(energy_distance, (x, y))
    assert torch.autograd.gradcheck(lambda a, b: mmd_rbf(a, b, bandwidths=(0.5, 2.0)), (x, y))


# ---------------------------------------------------------------- mean delta, config, set_loss


def test_mean_delta_known_answer():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # last cell is padding
    target = torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]])  # mean (0, 0)
    control = torch.tensor([[[5.0, -3.0], [7.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # set means (2, 3) and (0, 0): ((2 - 0)^2 + (3 - 0)^2) / 2 = 6.5, whatever the control.
    got = mean_delta_loss(pred, target, control, mask_pred=mask, mask_control=mask)
    assert got.item() == pytest.approx(6.5)
    c = control[0, :2].mean(0)
    explicit = (((pred[0, :2].mean(0) - c) - (target[0].mean(0) - c)) ** 2).mean()
    assert got.item() == pytest.approx(explicit.item())
    with pytest.raises(ValueError, match="control"):
        mean_delta_loss(pred, target, control[:, :, :1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "wasserstein"},
        {"mean_weight": -0.1},
        {"mean_weight": float("nan")},
        {"blur": 0.0},
        {"bandwidths": ()},
        {"bandwidths": (1.0, -2.0)},
        {"scaling": 1.0},
        {"n_iters": -1},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        SetLossConfig(**kwargs)


def test_config_defaults_and_list_bandwidths():
    cfg = SetLossConfig(bandwidths=[1, 10])
    assert cfg.bandwidths == (1.0, 10.0)
    assert SetLossConfig().kind == "energy" and SetLossConfig().blur == 0.05


def test_shape_errors():
    x = _sets(23, 2, 4, 3)
    with pytest.raises(ValueError, match="equal B and G"):
        energy_distance(x, _sets(24, 2, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        energy_distance(x, x, mask_pred=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="B, S, G"):
        energy_distance(x[0], x[0])


@pytest.mark.parametrize("kind", ["energy", "mmd", "sinkhorn"])
def test_set_loss_dispatch_and_total(kind):
    x, y = _sets(25, 3, 6, 4), _sets(26, 3, 5, 4, shift=0.3)
    control = _sets(27, 3, 7, 4)
    cfg = SetLossConfig(kind=kind, mean_weight=0.25, bandwidths=(1.0, 3.0))
    out = set_loss(cfg, x, y, control)
    assert set(out) == {"distribution", "mean", "total"}
    assert all(v.shape == (3,) for v in out.values())
    direct = {
        "energy": lambda: energy_distance(x, y),
        "mmd": lambda: mmd_rbf(x, y, bandwidths=(1.0, 3.0)),
        "sinkhorn": lambda: sinkhorn_divergence(x, y, blur=0.05),
    }[kind]()
    torch.testing.assert_close(out["distribution"], direct)
    torch.testing.assert_close(out["mean"], mean_delta_loss(x, y))
    torch.testing.assert_close(out["total"], out["distribution"] + 0.25 * out["mean"])


def test_half_precision_computed_in_float32():
    x, y = _sets(28, 2, 5, 3).bfloat16(), _sets(29, 2, 5, 3, shift=1.0).bfloat16()
    out = energy_distance(x, y)
    assert out.dtype == torch.float32
    ref = energy_distance(x.double(), y.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
