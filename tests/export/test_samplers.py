"""The numpy samplers against the torch ones (``models/diffusion``) on a fixed analytic
denoiser: DDIM with eps and v prediction on both schedules, Euler and Heun flow, guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.export.runtime.samplers import ddim, flow, guided
from latentcell.models.diffusion import FlowMatching, GaussianDiffusion
from latentcell.models.diffusion import guided as torch_guided

W = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32) * 0.3


def numpy_net(x, t, cond):
    return np.tanh(x @ W) + t[:, None] * cond["c"]


def torch_net(x, t, cond):
    return torch.tanh(x @ torch.from_numpy(W)) + t[:, None] * cond["c"]


def _pair(scale):
    cond = np.linspace(-1, 1, 5 * 6, dtype=np.float32).reshape(5, 6)
    null = np.zeros_like(cond)
    ours = guided(numpy_net, {"c": cond}, {"c": null}, scale)
    theirs = torch_guided(
        torch_net, {"c": torch.from_numpy(cond)}, {"c": torch.from_numpy(null)}, scale
    )
    return ours, theirs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_ddim_matches_torch(schedule, prediction, scale):
    process = GaussianDiffusion(schedule, 1000, prediction)
    noise = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    ours, theirs = _pair(scale)
    want = process.sample(theirs, torch.from_numpy(noise), steps=25).numpy()
    got = ddim(ours, noise, process.alphas_cumprod.numpy(), prediction, 25)
    assert np.abs(want - noise).max() > 0.1
    # eps prediction divides by sqrt(alpha_bar) ~ 0.006 at the first step, so an arbitrary
    # (untrained) net reaches values of 1e4: float32 agreement is relative there
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_matches_torch(solver):
    noise = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    ours, theirs = _pair(2.0)
    want = FlowMatching(solver).sample(theirs, torch.from_numpy(noise), steps=20).numpy()
    np.testing.assert_allclose(flow(ours, noise, 20, solver), want, atol=1e-5)


def test_stochastic_ddim_is_seeded_and_differs_from_deterministic():
    process = GaussianDiffusion("cosine", 1000, "v")
    alphas = process.alphas_cumprod.numpy()
    noise = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    ours, _ = _pair(1.0)
    a = ddim(ours, noise, alphas, "v", 10, eta=1.0, rng=np.random.default_rng(0))
    b = ddim(ours, noise, alphas, "v", 10, eta=1.0, rng=np.random.default_rng(0))
    c = ddim(ours, noise, alphas, "v", 10, eta=0.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
