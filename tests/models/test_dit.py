"""The DiT and the latent diffusion wrapper: adaLN-Zero start, conditioning, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiT, DiTConfig
from latentcell.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero weights everywhere (undoes the zero init) to probe the wiring."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(n=6, d=10, codes=((0, 1),), values=(0.3,)):
    x = torch.randn(n, d)
    t = torch.rand(n)
    c = torch.tensor(codes * n)[:n]
    v = torch.tensor([values] * n, dtype=torch.float32)
    return x, t, c, v


def test_adaln_zero_starts_at_zero_and_still_learns():
    model = DiT(DiTConfig(n_latent=10, patch_size=4, hidden=32, depth=2, heads=4,
                          n_categories=(3, 2), n_continuous=1))  # fmt: skip
    x, t, c, v = inputs()
    out = model(x, t, c, v)
    assert out.shape == (6, 10) and torch.count_nonzero(out) == 0
    out.pow(2).sum().backward()
    (x.sum() - model(x, t, c, v).sum()).backward()
    assert model.final.linear.weight.grad.abs().sum() > 0  # gradient reaches the zero layer


def test_tokens_pad_the_latent_to_whole_patches():
    config = DiTConfig(n_latent=10, patch_size=4, hidden=16, depth=1, heads=2)
    assert config.n_tokens == 3
    model = perturbed(DiT(config))
    x, t, _, _ = inputs()
    codes, values = model.null_condition(6)
    assert codes.shape == (6, 0) and values.shape == (6, 0)
    assert model(x, t, codes, values).shape == (6, 10)


def test_explicit_attention_equals_sdpa():
    """The export's transpose-free attention is the same function as the SDPA one."""
    model = perturbed(DiT(DiTConfig(n_latent=10, patch_size=2, hidden=32, depth=2, heads=4,
                                    n_categories=(3, 2), n_continuous=1)))  # fmt: skip
    x, t, c, v = inputs()
    with torch.no_grad():
        reference = model(x, t, c, v)
        for block in model.blocks:
            block.attn.explicit = True
        explicit = model(x, t, c, v)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)


def test_each_condition_changes_the_output_and_nan_means_null():
    model = perturbed(DiT(DiTConfig(n_latent=4, hidden=16, depth=1, heads=2,
                                    n_categories=(3,), n_continuous=1)))  # fmt: skip
    x, t = torch.randn(1, 4), torch.rand(1)
    base = model(x, t, torch.tensor([[0]]), torch.tensor([[0.5]]))
    assert not torch.allclose(base, model(x, t, torch.tensor([[1]]), torch.tensor([[0.5]])))
    assert not torch.allclose(base, model(x, t, torch.tensor([[0]]), torch.tensor([[-1.0]])))
    null = model(x, t, torch.tensor([[3]]), torch.tensor([[float("nan")]]))
    assert torch.isfinite(null).all()
    codes, values = model.null_condition(1)
    torch.testing.assert_close(null, model(x, t, codes, values))


def test_padded_cells_do_not_enter_the_loss():
    config = LatentDiffusionConfig(
        dit=DiTConfig(n_latent=4, hidden=16, depth=1, heads=2, n_categories=(2,)),
        categorical_keys=("cell_type",),
        cfg_dropout=0.0,
    )
    model = perturbed(LatentDiffusion(config))
    batch = {
        "X": torch.randn(8, 4),
        "obs": {"cell_type": torch.tensor([0, 1] * 4)},
        "is_pad": torch.tensor([False] * 5 + [True] * 3),
    }
    torch.manual_seed(3)
    a = model(batch)
    batch["X"][5:] = 1e3
    torch.manual_seed(3)
    b = model(batch)
    assert a.n_cells.item() == 5
    torch.testing.assert_close(a.loss, b.loss)


def wrong_side(z: torch.Tensor, label: int) -> float:
    return ((z[:, 0] > 0) != bool(label)).float().mean().item()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_learns_a_conditional_mixture_and_guidance_sharpens_it(objective):
    """Two cell types at +-2 in a 2-D latent: conditional samples land on their own mode."""
    torch.manual_seed(0)
    config = LatentDiffusionConfig(
        dit=DiTConfig(n_latent=2, hidden=64, depth=2, heads=4, n_categories=(2,)),
        diffusion=DiffusionConfig(objective=objective, prediction="v", sample_steps=25),
        categorical_keys=("cell_type",),
        cfg_dropout=0.2,
    )
    model = LatentDiffusion(config)
    model.set_latent_stats(torch.zeros(2), 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(500):
        labels = torch.randint(0, 2, (256,))
        z = (labels.float() * 4 - 2)[:, None] + 0.3 * torch.randn(256, 2)
        loss = model({"X": z, "obs": {"cell_type": labels}}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    for label, centre in ((0, -2.0), (1, 2.0)):
        codes = torch.full((400, 1), label)
        values = torch.zeros(400, 0)
        z = model.sample(codes, values, guidance=1.0, generator=g)
        assert (z.mean(0) - centre).abs().max() < 0.35, z.mean(0)
        z_guided = model.sample(codes, values, guidance=3.0, generator=g)
        assert wrong_side(z_guided, label) <= wrong_side(z, label) + 0.01
    null_codes = torch.full((400, 1), 2)  # the learned null: unconditional, both modes
    z = model.sample(null_codes, torch.zeros(400, 0), generator=g)
    assert 0.2 < (z[:, 0] > 0).float().mean() < 0.8


def test_shared_modulation_is_the_per_row_modulation_broadcast():
    """A sampler's one condition for every row (the exported shared denoiser) computes what
    the per-row path computes, and forward is the split path end to end."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(n_latent=10, patch_size=5, hidden=32, depth=2, heads=2,
                        n_categories=(3,), n_continuous=0)).eval()  # fmt: skip
    for p in dit.parameters():  # adaLN-Zero starts at zero: give the modulation some weight
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(6, 10), torch.full((6,), 0.3)
    codes, values = torch.full((6, 1), 2, dtype=torch.long), torch.zeros(6, 0)
    with torch.no_grad():
        per_row = dit.modulations(t, codes, values)
        assert per_row.shape == (6, dit.modulation_width)
        whole = dit(x, t, codes, values)
        np.testing.assert_allclose(dit.forward_modulated(x, per_row), whole, atol=1e-6)
        shared = dit.forward_modulated(x, per_row[:1])
    np.testing.assert_allclose(shared.numpy(), whole.numpy(), atol=1e-5)
