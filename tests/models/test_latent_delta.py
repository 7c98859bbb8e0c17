"""Perturbation latent diffusion on latents whose answer is known: each perturbation moves
every control latent by its own vector. The delta predictor recovers the vectors, the DiT's
samples land on them with the controls' spread, guidance 0 forgets the perturbation but not
the control, and the absolute target recovers the perturbed latents themselves."""

from __future__ import annotations

import pytest
import torch

from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_delta import LatentDelta, LatentDeltaConfig

D, P = 4, 3  # latent size; labels: 0 is the control, 1 and 2 perturb
SHIFTS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.0, 1.0], [-1.5, 0.0, 2.0, 0.0]])


def _pairs(n: int, generator: torch.Generator):
    z_c = torch.randn(n, D, generator=generator) + torch.tensor([1.0, 0.0, -1.0, 0.5])
    p = torch.randint(1, P, (n,), generator=generator)
    z_p = z_c + SHIFTS[p] + 0.05 * torch.randn(n, D, generator=generator)
    return z_c, z_p, p


def _trained(target: str, steps: int = 400) -> LatentDelta:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = LatentDeltaConfig(
        D, P, target, predictor_hidden=(32, 32), embedding_dim=8,
        dit=DiTConfig(n_latent=D, hidden=32, depth=2, heads=2),
        diffusion=DiffusionConfig(sample_steps=25), cfg_dropout=0.2,
    )  # fmt: skip
    model = LatentDelta(config)
    z_c, z_p, _ = _pairs(4096, g)
    x = model.target_of(z_c, z_p)
    model.set_stats(z_c.mean(0), z_c.std(0), x.mean(0), 1.0 / float((x - x.mean(0)).std()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        z_c, z_p, p = _pairs(128, g)
        out = model({"z_control": z_c, "z_perturbed": z_p, "perturbation": p})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def delta_model():
    return _trained("delta")


def test_an_untrained_predictor_says_the_training_mean():
    config = LatentDeltaConfig(D, P, dit=DiTConfig(n_latent=D, hidden=16, depth=1, heads=1))
    model = LatentDelta(config)
    model.set_stats(torch.zeros(D), torch.ones(D), torch.tensor([1.0, 2.0, 3.0, 4.0]), 2.0)
    out = model.predict_mean(torch.randn(5, D), torch.tensor([1, 2, 1, 2, 1]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(5, -1))


def test_the_delta_predictor_recovers_each_perturbations_shift(delta_model):
    g = torch.Generator().manual_seed(1)
    z_c = torch.randn(500, D, generator=g)
    for p in (1, 2):
        x = delta_model.predict_mean(z_c, torch.full((500,), p))
        assert (x.mean(0) - SHIFTS[p]).abs().max() < 0.15, (p, x.mean(0))


def test_sampled_shifts_land_on_the_shift_and_keep_each_control(delta_model):
    g = torch.Generator().manual_seed(2)
    z_c = torch.randn(400, D, generator=g) + torch.tensor([1.0, 0.0, -1.0, 0.5])
    noise = torch.randn(400, D, generator=g)
    x = delta_model.sample(z_c, torch.full((400,), 1), noise, steps=25, guidance=1.0)
    z = delta_model.latent_of(z_c, x)
    assert (x.mean(0) - SHIFTS[1]).abs().max() < 0.25, x.mean(0)
    # each predicted cell is its own control moved: the spread of the controls survives
    assert torch.corrcoef(torch.stack([z[:, 0], z_c[:, 0]]))[0, 1] > 0.9
    assert 0.7 < z.std(0).mean() / z_c.std(0).mean() < 1.3


def test_guidance_zero_forgets_the_perturbation_but_not_the_control(delta_model):
    g = torch.Generator().manual_seed(3)
    z_c = torch.randn(400, D, generator=g)
    noise = torch.randn(400, D, generator=g)
    shifts = {}
    for p in (1, 2):
        x = delta_model.sample(z_c, torch.full((400,), p), noise, steps=25, guidance=0.0)
        shifts[p] = x.mean(0)
    # unconditional on the perturbation: the same shift whatever p, about their average
    assert (shifts[1] - shifts[2]).abs().max() < 0.3, shifts
    assert (shifts[1] - SHIFTS[1:].mean(0)).abs().max() < 0.6, shifts[1]
    conditional = delta_model.sample(z_c, torch.full((400,), 2), noise, steps=25, guidance=1.0)
    assert (conditional.mean(0) - SHIFTS[2]).abs().max() < 0.25


def test_the_absolute_target_samples_the_perturbed_latents():
    model = _trained("absolute")
    g = torch.Generator().manual_seed(4)
    z_c, z_p, _ = _pairs(400, g)
    p = torch.full((400,), 2)
    real = z_c + SHIFTS[2]
    x = model.sample(z_c, p, torch.randn(400, D, generator=g), steps=25, guidance=1.0)
    assert torch.equal(model.latent_of(z_c, x), x)  # absolute: the sample is the latent
    assert (x.mean(0) - real.mean(0)).abs().max() < 0.3, (x.mean(0), real.mean(0))
    assert (model.predict_mean(z_c, p).mean(0) - real.mean(0)).abs().max() < 0.2


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match="target"):
        LatentDeltaConfig(D, P, target="relative")
    with pytest.raises(ValueError, match="cfg_dropout"):
        LatentDeltaConfig(D, P, cfg_dropout=1.0)
