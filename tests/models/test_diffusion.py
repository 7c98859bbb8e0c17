"""Objectives and samplers checked against exact answers for Gaussian data.

For x0 ~ N(m, s^2) the optimal denoiser is known in closed form, so a correct sampler fed
with it must turn N(0, 1) noise back into N(m, s^2); a wrong update rule shifts the moments.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentcell.models.diffusion import (
    DiffusionConfig,
    FlowMatching,
    GaussianDiffusion,
    guided,
    make_alphas_cumprod,
    make_process,
)

M, S = 1.5, 0.4


def gaussian_oracle(process: GaussianDiffusion):
    """E[eps | x_t] (or the implied v) for x0 ~ N(M, S^2)."""

    def denoise(x, t):
        step = (t * process.n_train_steps).round().long()
        a = process.alphas_cumprod[step].to(x.dtype).reshape(-1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)
        if process.prediction == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoise


def flow_oracle(x, t):
    """E[eps - x0 | x_t] for x_t = (1-t) x0 + t eps."""
    t = t.to(x.dtype).reshape(-1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    centred = x - (1 - t) * M
    e_x0 = M + (1 - t) * S**2 / var * centred
    e_eps = t / var * centred
    return e_eps - e_x0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_decrease_from_one_to_near_zero(schedule):
    a = make_alphas_cumprod(schedule, 1000)
    assert a.shape == (1000,)
    assert torch.all(a[1:] < a[:-1])
    assert a[0] > 0.99 and a[-1] < 1e-3 and a[-1] > 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_exact_denoiser_recovers_the_data_distribution(prediction):
    """DDIM is first order: the error in the std halves as the steps double."""
    process = GaussianDiffusion("cosine", 1000, prediction)
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for steps in (25, 50, 250):
        x = process.sample(gaussian_oracle(process), noise, steps=steps)
        assert abs(x.mean().item() - M) < 0.02
        err[steps] = abs(x.std().item() - S)
    assert err[250] < 0.01 and err[50] < 0.015
    assert 1.5 < err[25] / err[50] < 2.5


def test_stochastic_ddim_also_recovers_it():
    process = GaussianDiffusion("linear", 1000, "eps")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20_000, 1, generator=g, dtype=torch.float64)
    x = process.sample(gaussian_oracle(process), noise, steps=200, eta=1.0, generator=g)
    assert abs(x.mean().item() - M) < 0.03
    assert abs(x.std().item() - S) < 0.03


def test_eps_and_v_parameterizations_agree():
    process = GaussianDiffusion("cosine", 1000, "v")
    x0 = torch.randn(64, 3, dtype=torch.float64)
    noise = torch.randn(64, 3, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,))
    x_t = process.q_sample(x0, t, noise)
    a = process.alphas_cumprod[t].reshape(-1, 1)
    x0_hat, eps_hat = process.split_prediction(x_t, a, process.target(x0, t, noise))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


def test_ddim_timesteps_cover_both_ends():
    process = GaussianDiffusion("cosine", 1000)
    taus = process.timesteps(50)
    assert len(taus) == 50 and taus[0] == 999 and taus[-1] == 0
    assert list(process.timesteps(1)) == [0]
    with pytest.raises(ValueError):
        process.timesteps(1001)


@pytest.mark.parametrize("solver,steps", [("euler", 200), ("heun", 20)])
def test_flow_ode_with_exact_velocity_recovers_the_data_distribution(solver, steps):
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = FlowMatching(solver).sample(flow_oracle, noise, steps=steps)
    assert abs(x.mean().item() - M) < 0.02
    assert abs(x.std().item() - S) < 0.02


def test_heun_beats_euler_at_equal_steps():
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {
        solver: abs(FlowMatching(solver).sample(flow_oracle, noise, 8).std().item() - S)
        for solver in ("euler", "heun")
    }
    assert err["heun"] < err["euler"] / 3


@pytest.mark.parametrize("config", [DiffusionConfig(), DiffusionConfig(objective="flow")])
def test_training_loss_is_minimized_by_the_exact_denoiser(config):
    process = make_process(config)
    oracle = flow_oracle if config.objective == "flow" else gaussian_oracle(process)
    g = torch.Generator().manual_seed(0)
    x0 = M + S * torch.randn(50_000, 1, generator=g, dtype=torch.float64)
    best = process.training_loss(oracle, x0, generator=torch.Generator().manual_seed(2)).mean()
    worse = process.training_loss(
        lambda x, t: oracle(x, t) * 0.8, x0, generator=torch.Generator().manual_seed(2)
    ).mean()
    assert best < worse


def test_guidance_batches_both_passes_and_interpolates():
    calls = []

    def denoise(x, t, cond):
        calls.append(x.shape[0])
        return cond.expand_as(x).to(x.dtype)

    x, t = torch.zeros(4, 2), torch.zeros(4)
    cond, null = torch.full((4, 1), 3.0), torch.full((4, 1), 1.0)
    out = guided(denoise, cond, null, scale=2.5)(x, t)
    assert calls == [8]  # one forward over conditional + unconditional rows
    torch.testing.assert_close(out, torch.full((4, 2), 1.0 + 2.5 * (3.0 - 1.0)))
    calls.clear()
    torch.testing.assert_close(guided(denoise, cond, null, 1.0)(x, t), torch.full((4, 2), 3.0))
    assert calls == [4]  # scale 1 is the conditional model: no unconditional pass
    torch.testing.assert_close(guided(denoise, cond, null, 0.0)(x, t), torch.full((4, 2), 1.0))


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="objective"):
        DiffusionConfig(objective="score")
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="x0")
    assert math.isfinite(DiffusionConfig().guidance)
