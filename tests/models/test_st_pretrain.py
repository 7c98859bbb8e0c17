"""STPretrainModel: STModel's state-dict names, the masked objective's terms, deterministic
eval masks, padded sets ignored, and that the masked MSE can be learned."""

from __future__ import annotations

import pytest
import torch

from latentcell.models.count_vae import normalize_log1p
from latentcell.models.perturbation_encoders import PerturbationEncoderConfig
from latentcell.models.st_model import STConfig, STModel
from latentcell.models.st_pretrain import MaskedSetObjective, STPretrainModel

GENES, SET = 40, 12


def _config(**kw) -> STConfig:
    base = dict(
        n_features=GENES, perturbation_labels=("non-targeting",), hidden=16, depth=1, heads=2
    )
    return STConfig(**{**base, **kw})


def _batch(n_sets=3, seed=0, pad=None) -> dict:
    """Sets whose cells share a set-specific expression profile (so the set predicts them)."""
    g = torch.Generator().manual_seed(seed)
    profile = torch.rand(n_sets, 1, GENES, generator=g) * 4
    X = torch.poisson(profile.expand(n_sets, SET, GENES).contiguous(), generator=g)
    return {
        "cells": {"X": X, "library_size": X.sum(-1).clamp_min(1)},
        "cell_type": torch.zeros(n_sets, dtype=torch.long),
        "set_id": torch.arange(n_sets) + 100 * seed,
        "is_pad": torch.zeros(n_sets, dtype=torch.bool) if pad is None else pad,
    }


def test_state_dict_names_and_shapes_are_stmodels():
    for kw in ({}, {"conditioning": "cross"}, {"n_cell_types": 3, "n_batches": 2}):
        torch.manual_seed(0)
        plain = STModel(_config(**kw)).state_dict()
        torch.manual_seed(0)
        pre = STPretrainModel(_config(**kw)).state_dict()
        assert list(pre) == list(plain)
        assert all(pre[k].shape == plain[k].shape for k in plain)


def test_untrained_model_returns_the_corrupted_input():
    torch.manual_seed(0)
    model = STPretrainModel(_config())
    with torch.no_grad():
        out = model(_batch())
    # zero-initialized head: pred = corrupted input, so the masked MSE is the baseline's
    torch.testing.assert_close(out.masked_mse, out.masked_mse_input)
    assert float(out.visible_mse) == 0.0 and float(out.masked_mse) > 0
    assert int(out.n_cells) == 3 * SET
    o = model.objective
    expected = (
        o.mse_weight * out.masked_mse
        + o.visible_weight * out.visible_mse
        + o.energy_weight * out.energy
    )
    torch.testing.assert_close(out.loss, expected)
    assert set(out.metrics()) == {"loss", "masked_mse", "masked_mse_input", "visible_mse", "energy"}


def test_masks_fraction_random_in_training_fixed_per_set_in_eval():
    model = STPretrainModel(_config(), MaskedSetObjective(mask_fraction=0.3))
    shape = torch.Size((4, 64, 50))
    ids = torch.tensor([3, 7, 9, 11])
    model.train()
    a, b = model.gene_mask(shape, torch.device("cpu"), ids), model.gene_mask(shape, "cpu", ids)
    assert abs(a.float().mean().item() - 0.3) < 0.02 and not torch.equal(a, b)
    model.eval()
    c = model.gene_mask(shape, torch.device("cpu"), ids)
    assert torch.equal(c, model.gene_mask(shape, torch.device("cpu"), ids))
    assert abs(c.float().mean().item() - 0.3) < 0.02
    # a set's eval mask does not depend on the sets batched with it
    alone = model.gene_mask(torch.Size((1, 64, 50)), torch.device("cpu"), ids[2:3])
    assert torch.equal(alone[0], c[2])
    model.eval()
    batch = _batch()
    assert torch.equal(model(batch).loss, model(batch).loss)


def test_padded_sets_do_not_count():
    torch.manual_seed(0)
    model = STPretrainModel(_config()).eval()
    real = _batch(n_sets=2)
    padded = _batch(n_sets=3, pad=torch.tensor([False, False, True]))
    padded["cells"] = {k: v.clone() for k, v in padded["cells"].items()}
    for key in ("X", "library_size"):
        padded["cells"][key][:2] = real["cells"][key]
    padded["cells"]["X"][2] *= 50  # a wild padded set
    padded["set_id"][:2] = real["set_id"]
    a, b = model(real), model(padded)
    torch.testing.assert_close(a.loss, b.loss)
    assert int(b.n_cells) == 2 * SET


def test_masked_mse_is_learned():
    torch.manual_seed(0)
    model = STPretrainModel(_config(hidden=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        out = model(_batch(n_sets=8, seed=step + 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(_batch(n_sets=8, seed=10_000))  # sets never trained on
    assert float(out.masked_mse) < 0.6 * float(out.masked_mse_input)


def test_gradients_reach_the_shared_tensors():
    model = STPretrainModel(_config())
    with torch.no_grad():
        model.head.weight.normal_(std=0.01)  # past the zero init, so the encoder gets signal
    model(_batch()).loss.backward()
    for name in ("cell_encoder.0.weight", "blocks.0.attn.q.weight", "norm.weight", "head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_features_are_log1p_normalized_counts():
    torch.manual_seed(0)
    model = STPretrainModel(_config(), MaskedSetObjective(energy_weight=0.0))
    batch = _batch(n_sets=1)
    X, lib = batch["cells"]["X"], batch["cells"]["library_size"]
    clean = normalize_log1p(X[0], lib[0])
    masked = model.eval().gene_mask(torch.Size((1, SET, GENES)), "cpu", batch["set_id"])[0]
    expected = (clean[masked] ** 2).mean()
    torch.testing.assert_close(model(batch).masked_mse_input, expected)


def test_rejects_configs_it_cannot_pretrain():
    with pytest.raises(ValueError, match="gene"):
        STPretrainModel(_config(space="latent"))
    with pytest.raises(ValueError, match="control"):
        STPretrainModel(_config(perturbation_labels=("non-targeting", "STAT1")))
    gene_table = PerturbationEncoderConfig(kind="gene_table")
    with pytest.raises(ValueError, match="onehot"):
        STPretrainModel(_config(perturbation=gene_table))
    for bad in ({"mask_fraction": 0.0}, {"mask_fraction": 1.0}, {"energy_weight": -1.0}):
        with pytest.raises(ValueError):
            MaskedSetObjective(**bad)
