"""The masked-diffusion family's pieces on data whose answer is known: the bins, the masking
schedule and its ELBO weight, the adaptive mask rates, the unmasking sampler, and a tiny model
that must learn a dependence on the perturbation and on the control set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.inference.masked_diffusion_predictor import ModelSampler, model_settings
from latentcell.inference.masked_diffusion_sampling import unmask
from latentcell.models.expression_bins import bin_values, fit_bin_edges, values_from_bins
from latentcell.models.masked_diffusion import (
    MaskedDiffusion,
    MaskedDiffusionConfig,
    elbo_weight,
    mask_probability,
)


def test_bins_zero_quantiles_and_roundtrip():
    rng = np.random.default_rng(0)
    x = np.where(rng.random((500, 40)) < 0.6, 0.0, rng.gamma(2.0, 0.7, (500, 40))).astype(
        np.float32
    )
    edges = fit_bin_edges(x, 6)
    nonzero = x[x > 0]
    assert edges[0] == pytest.approx(nonzero.min()) and edges[-1] == pytest.approx(nonzero.max())
    bins = bin_values(x, edges)
    assert (bins[x == 0] == 0).all() and (bins[x > 0] >= 1).all() and bins.max() == 5
    counts = np.bincount(bins[x > 0], minlength=6)[1:]  # quantile bins: equal shares
    assert counts.min() / counts.max() > 0.95
    values = values_from_bins(bins, edges, rng)
    assert (values[bins == 0] == 0).all()
    assert (bin_values(values, edges)[bins > 0] == bins[bins > 0]).mean() > 0.999
    with pytest.raises(ValueError, match="nonzero"):
        fit_bin_edges(np.zeros(10), 4)


def _model(**overrides) -> MaskedDiffusion:
    config = dict(n_genes=10, perturbation_labels=("ctrl", "A", "B"), target_genes=((), (2,), ()),
                  hidden=16, depth=1, heads=2, control_depth=1, n_bins=5, patch_size=4)  # fmt: skip
    config.update(overrides)
    return MaskedDiffusion(MaskedDiffusionConfig(**config))


def test_torch_tokens_equal_numpy_bins_and_patches_cover_every_gene():
    rng = np.random.default_rng(1)
    x = np.where(rng.random((3, 4, 10)) < 0.5, 0, rng.gamma(2, 1, (3, 4, 10))).astype(np.float32)
    model = _model()
    edges = fit_bin_edges(x, 5)
    model.set_statistics(edges, np.ones(10), np.ones(3))
    assert torch.equal(model.tokenize(torch.from_numpy(x)), torch.from_numpy(bin_values(x, edges)))
    tokens = torch.from_numpy(bin_values(x, edges))
    memory = model.encode_controls(torch.from_numpy(x))
    logits = model.logits(tokens, tokens.clamp(max=4), memory, torch.tensor([0, 1, 3]))  # 3: null
    assert logits.shape == (3, 4, 10, 5)  # 10 genes in 3 patches of 4, the pad dropped


def test_the_schedule_and_its_elbo_weight():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)[:, None]
    w = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    p = mask_probability(t, w)
    zero, one = torch.zeros(1, 1, dtype=w.dtype), torch.ones(1, 1, dtype=w.dtype)
    assert torch.allclose(mask_probability(zero, w), torch.zeros(3, dtype=w.dtype))
    assert torch.allclose(mask_probability(one, w), torch.ones(3, dtype=w.dtype))
    assert (p[:, 2] > p[:, 1]).all() and (p[:, 1] > p[:, 0]).all()  # heavier: masked earlier
    eps = 1e-4  # -alpha'(t) / (1 - alpha(t)) by finite differences
    alpha = lambda s: 1 - mask_probability(s, w)  # noqa: E731
    numeric = -(alpha(t + eps) - alpha(t - eps)) / (2 * eps) / mask_probability(t, w)
    assert torch.allclose(elbo_weight(t, w), numeric, rtol=1e-4)
    assert torch.allclose(
        elbo_weight(t, torch.ones(1, dtype=t.dtype)), 1 / t
    )  # MDLM's linear schedule


def test_adaptive_weights_set_each_genes_mask_rate():
    torch.manual_seed(0)
    model = _model().train()
    weights = torch.tensor([0.25, 1.0, 4.0] + [1.0] * 7)
    model.set_statistics(torch.linspace(0, 1, 5), weights, torch.zeros(3))
    t = torch.full((40_000, 1, 1), 0.3)  # sd of a rate: about 0.0023
    rate = model.draw_masks(t, 10).float().mean((0, 1))
    expected = 1 - 0.7**weights
    assert torch.allclose(rate, expected, atol=0.012)


def test_unmasking_samples_the_distributions_and_opens_confident_genes_first():
    rng = np.random.default_rng(0)
    probs = np.array([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25],
                      [0.1, 0.2, 0.3, 0.4]] * 2)  # 6 genes, K = 4  # fmt: skip
    logp = np.log(probs)
    calls = []

    def log_probs(tokens):
        calls.append(tokens.copy())
        return np.broadcast_to(logp, (*tokens.shape, 4)).copy()

    bins = unmask(log_probs, (4000, 6), 4, 3, rng)
    assert (bins < 4).all() and len(calls) == 3
    for g in range(6):  # the kept bins are draws from each gene's own distribution
        freq = np.bincount(bins[:, g], minlength=4) / len(bins)
        assert np.abs(freq - probs[g]).max() < 0.03
    opened = calls[1][0] < 4  # after step 1 of 3: 2 of 6 genes, the peaked ones
    assert opened.tolist() == [True, False, False, True, False, False]


def _Sampler(model, steps=8, guidance=1.0) -> ModelSampler:  # noqa: N802
    settings = {**model_settings(model, 8, "ctrl"), "sample_steps": steps, "guidance": guidance}
    return ModelSampler(model, settings, [f"g{i}" for i in range(model.config.n_genes)], "test")


def _batch(gen: torch.Generator, n_sets: int = 8, size: int = 8) -> dict:
    """Genes 0-3 at level 3 under A, genes 4-7 under B (else 0); genes 8-9 copy the level of
    the control SET (0.5 or 2.5, one per set): a known dependence on each condition."""
    codes = torch.randint(1, 3, (n_sets,), generator=gen)
    level = torch.where(torch.rand(n_sets, generator=gen) < 0.5, 0.5, 2.5)
    control = torch.zeros(n_sets, size, 10)
    control[:, :, 8:] = level[:, None, None]
    target = torch.zeros(n_sets, size, 10)
    target[codes == 1, :, 0:4] = 3.0
    target[codes == 2, :, 4:8] = 3.0
    target[:, :, 8:] = level[:, None, None]
    return {"control": {"features": control}, "perturbed": {"features": target},
            "perturbation": codes, "is_pad": torch.zeros(n_sets, dtype=torch.bool)}  # fmt: skip


@pytest.fixture(scope="module")
def learned():
    torch.manual_seed(0)
    model = _model(patch_size=2, hidden=32, cond_dropout=0.2)
    model.set_statistics(np.array([0.4, 1.0, 2.0, 2.8, 3.2], np.float32), np.ones(10), np.ones(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = model(_batch(gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_tiny_model_learns_the_perturbation_and_the_controls(learned):
    rng = np.random.default_rng(0)
    for level, expect in ((0.5, 1), (2.5, 3)):  # bins of 0.5 and 2.5
        control = np.zeros((16, 10), np.float32)
        control[:, 8:] = level
        for label, on, off in (("A", slice(0, 4), slice(4, 8)), ("B", slice(4, 8), slice(0, 4))):
            out = _Sampler(learned).predict(control, label, "any", rng=rng)
            bins = bin_values(out, learned.edges.numpy())
            assert (bins[:, on] == 4).mean() > 0.9 and (bins[:, off] == 0).mean() > 0.9
            assert (bins[:, 8:] == expect).mean() > 0.9


def test_guidance_zero_is_the_null_condition(learned):
    """w = 0 samples the unconditional model: a mixture of A-like and B-like cells (each
    whole: never both programs), where w = 1 follows the label."""
    control = np.zeros((200, 10), np.float32)
    share = {}
    for w in (0.0, 1.0):
        out = _Sampler(learned, guidance=w).predict(control, "A", "any",
                                                    rng=np.random.default_rng(0))  # fmt: skip
        bins = bin_values(out, learned.edges.numpy())
        a_on, b_on = (bins[:, 0:4] == 4).mean(1) > 0.5, (bins[:, 4:8] == 4).mean(1) > 0.5
        assert (a_on & b_on).mean() < 0.05
        share[w] = (a_on.mean(), b_on.mean())
    assert share[1.0][0] > 0.9
    assert min(share[0.0]) > 0.05 and sum(share[0.0]) > 0.85


def test_random_order_opens_a_uniform_subset():
    """``order="random"``: the genes opened first are a uniform draw, whatever their
    confidence, and the kept bins still follow each gene's distribution."""
    probs = np.array([[0.97, 0.01, 0.01, 0.01]] * 3 + [[0.25, 0.25, 0.25, 0.25]] * 3)
    first = []

    def log_probs(tokens):
        if not first:
            first.append(None)
        elif len(first) == 1:
            first.append((tokens < 4).mean(0))  # share of cells with each gene open
        return np.broadcast_to(np.log(probs), (*tokens.shape, 4)).copy()

    bins = unmask(log_probs, (4000, 6), 4, 3, np.random.default_rng(0), order="random")
    assert np.allclose(first[1], 1 / 3, atol=0.03)  # 2 of 6 genes open after step 1
    for g in range(6):
        freq = np.bincount(bins[:, g], minlength=4) / len(bins)
        assert np.abs(freq - probs[g]).max() < 0.03
