"""The joint RNA + protein VAE: trained on synthetic cells whose proteins and genes are known
functions of one latent, translation in either direction recovers that dependence on
held-out cells (far above a shuffled baseline); its alignment term is the KL of torch's
distributions; pad cells are out of every term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.models.multiomics import ALIGNMENTS, MultiomicsConfig, MultiomicsVAE, _gaussian_kl
from tests.multiomics_data import column_pearson, synthetic_cite


def _trained(alignment: str, cross: bool = True, steps: int = 400) -> tuple:
    torch.manual_seed(0)
    data = synthetic_cite(n_cells=600)
    rna = data.adata.X.toarray()
    protein = data.adata.obsm["protein_counts"].to_numpy()
    config = MultiomicsConfig(rna.shape[1], protein.shape[1], n_latent=8, n_hidden=64,
                              alignment=alignment, cross_reconstruction=cross,
                              kl_warmup_steps=100)  # fmt: skip
    model = MultiomicsVAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for step in range(steps):
        rows = rng.choice(500, 128, replace=False)
        batch = {"rna": torch.from_numpy(rna[rows]), "protein": torch.from_numpy(protein[rows])}
        loss = model(batch, step=step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data, rna[500:], protein[500:]


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_translation_recovers_the_latent_dependence(alignment):
    torch.set_num_threads(1)
    model, data, rna, protein = _trained(alignment)
    with torch.no_grad():
        to_protein = np.log1p(
            model.translate(torch.from_numpy(rna), "rna", "protein").numpy() * 1e4
        )
        to_rna = np.log1p(
            model.translate(torch.from_numpy(protein), "protein", "rna").numpy() * 1e4
        )
    truth = {m: t[500:] for m, t in data.truth.items()}
    shuffled = np.random.default_rng(1).permutation(len(rna))
    for pred, real in ((to_protein, truth["protein"]), (to_rna, truth["rna"])):
        r = column_pearson(pred, real).mean()
        baseline = column_pearson(pred[shuffled], real).mean()
        assert r > 0.85 and abs(baseline) < 0.2, (r, baseline)


def test_without_cross_reconstruction_the_alignment_alone_still_translates():
    """Self-reconstruction + alignment only: the aligned posteriors carry translation."""
    torch.set_num_threads(1)
    model, data, rna, _ = _trained("symmetric_kl", cross=False)
    with torch.no_grad():
        pred = np.log1p(model.translate(torch.from_numpy(rna), "rna", "protein").numpy() * 1e4)
    assert column_pearson(pred, data.truth["protein"][500:]).mean() > 0.7


def test_the_alignment_kl_is_torch_distributions_kl():
    g = torch.Generator().manual_seed(0)
    ma, mb = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    va, vb = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ours = _gaussian_kl(ma, va, mb, vb)
    p = torch.distributions.Normal(ma, torch.exp(0.5 * va))
    q = torch.distributions.Normal(mb, torch.exp(0.5 * vb))
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(p, q).sum(-1))


def test_pad_cells_count_in_no_term(monkeypatch):
    """Pads (here with 50x the counts) change no mean; draws are the posterior means so the
    two batches see the same z for the real cells."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    torch.manual_seed(0)
    model = MultiomicsVAE(MultiomicsConfig(6, 3, n_latent=2, n_hidden=8, dropout=0.0)).eval()
    rna, protein = torch.poisson(torch.full((4, 6), 3.0)), torch.poisson(torch.full((4, 3), 5.0))
    padded = {"rna": torch.cat([rna, rna[:1] * 50]), "protein": torch.cat([protein, protein[:1]]),
              "is_pad": torch.tensor([False] * 4 + [True])}  # fmt: skip
    plain, with_pad = model({"rna": rna, "protein": protein}), model(padded)
    assert int(with_pad.n_cells) == 4
    for key, value in plain.metrics().items():
        torch.testing.assert_close(torch.as_tensor(with_pad.metrics()[key]), torch.as_tensor(value))


def test_config_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="alignment"):
        MultiomicsConfig(10, 3, alignment="cosine")
    with pytest.raises(ValueError, match="rna_likelihood"):
        MultiomicsConfig(10, 3, rna_likelihood="gaussian")
    with pytest.raises(ValueError, match="n_genes and n_proteins"):
        MultiomicsConfig(10, 0)
