"""ConditionalVAE: shapes and conditioning, and, trained for a few hundred steps on counts
with known perturbation effects, Mode B (a cell re-encoded and decoded) against Mode A
(prior draws), and the decoder's response to the perturbation label under each likelihood."""

from __future__ import annotations

import pytest
import torch

from latentcell.models.count_vae import TARGET_SUM, CountVAEConfig, normalize_log1p
from latentcell.models.cvae import ConditionalVAE, conditioned_roles, cvae_config
from latentcell.models.likelihoods import sample_nb

G, KD, UP = 30, slice(0, 5), slice(5, 10)  # genes; "KD" knocks down 0-4, "UP" raises 5-9


def _cells(n: int, seed: int = 0):
    """(counts, perturbation, cell type, the true mean log1p expression under each label
    (3, n, G)): identity is a 2-d latent; perturbation 0 (control), 1 (KD: genes 0-4 at 10%)
    or 2 (UP: genes 5-9 x5), both then renormalized (proportions: the other genes move too);
    cell type 0/1 shifts the baseline."""
    g = torch.Generator().manual_seed(seed)
    loadings = torch.randn(G, 2, generator=torch.Generator().manual_seed(99))
    z = torch.randn(n, 2, generator=g)
    pert = torch.randint(0, 3, (n,), generator=g)
    cell_type = torch.randint(0, 2, (n,), generator=g)
    eta = z @ loadings.T + 0.5 * cell_type[:, None] * torch.linspace(-1, 1, G)
    effect = torch.zeros(3, G)
    effect[1, KD], effect[2, UP] = torch.log(torch.tensor(0.1)), torch.log(torch.tensor(5.0))
    library = torch.exp(torch.log(torch.tensor(2000.0)) + 0.3 * torch.randn(n, generator=g))
    mu = torch.softmax(eta + effect[pert], -1) * library[:, None]
    truth = torch.log1p(torch.softmax(eta[None] + effect[:, None], -1) * TARGET_SUM)
    return sample_nb(mu, torch.tensor(20.0), generator=g), pert, cell_type, truth


def _train(likelihood: str, steps: int = 300) -> tuple[ConditionalVAE, tuple]:
    torch.manual_seed(0)
    model = ConditionalVAE(cvae_config(G, 3, 2, likelihood=likelihood, n_latent=2, n_hidden=32,
                                       kl_warmup_steps=100))  # fmt: skip
    X, pert, cell_type, _ = _cells(1500)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        i = torch.randint(0, len(X), (128,), generator=g)
        batch = {"X": X[i], "obs": {"perturbation": pert[i], "cell_type": cell_type[i]}}
        loss = model(batch, step=step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), _cells(400, seed=5)


@pytest.fixture(scope="module")
def trained():
    return {lik: _train(lik) for lik in ("nb", "gaussian")}


def test_shapes_roles_and_conditioned_encoder():
    config = cvae_config(G, 4, 3, 2, n_latent=5, n_hidden=16)
    model = ConditionalVAE(config).eval()
    assert conditioned_roles(config) == model.roles == ("perturbation", "cell_type", "batch")
    assert config.n_conditions == 9 and config.encode_covariates
    X, pert, _, _ = _cells(6)
    codes = {"perturbation": pert, "cell_type": torch.zeros(6, dtype=torch.long),
             "batch": torch.ones(6, dtype=torch.long)}  # fmt: skip
    mean, log_var = model.encode_under(X, X.sum(-1), codes)
    assert mean.shape == log_var.shape == (6, 5)
    params = model.decode_under(mean, codes, X.sum(-1))
    assert params["mu"].shape == (6, G)
    torch.testing.assert_close(params["mu"].sum(-1), X.sum(-1))  # NB: scaled to the library
    other = {**codes, "perturbation": (pert + 1) % 4}
    assert not torch.allclose(model.encode_under(X, X.sum(-1), other)[0], mean)  # q(z | x, c)
    with pytest.raises(ValueError, match="lack"):
        model.encode_under(X, X.sum(-1), {"perturbation": pert})
    with pytest.raises(ValueError, match="perturbation"):
        ConditionalVAE(CountVAEConfig(n_genes=G))  # a plain CountVAE config


def test_mode_b_reconstructs_a_control_better_than_mode_a(trained):
    model, (X, pert, cell_type, _) = trained["nb"]
    control = pert == 0
    X, cell_type, library = X[control], cell_type[control], X[control].sum(-1)
    codes = {"perturbation": torch.zeros_like(cell_type), "cell_type": cell_type}
    truth = normalize_log1p(X, library)
    mode_b = model.mean_log1p(model.transfer(X, library, codes, codes))
    z = torch.randn(len(X), 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mode_a = model.mean_log1p(model.decode_under(z, codes, library))
    error_b = ((mode_b - truth) ** 2).mean().item()
    error_a = ((mode_a - truth) ** 2).mean().item()
    assert error_b < 0.7 * error_a, (error_b, error_a)


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_decoder_moves_genes_as_the_label_does(trained, likelihood):
    """Controls re-decoded under KD / UP against the generator's own mean log1p expression of
    the same cells under each label: the shift follows the true one gene by gene (the other
    genes' compositional move included) and the knocked-down genes fall by most of theirs."""
    model, (X, pert, cell_type, truth) = trained[likelihood]
    control = pert == 0
    X, cell_type, library, truth = (
        X[control],
        cell_type[control],
        X[control].sum(-1),
        truth[:, control],
    )

    def under(label: int) -> torch.Tensor:
        source = {"perturbation": torch.zeros_like(cell_type), "cell_type": cell_type}
        target = {**source, "perturbation": torch.full_like(cell_type, label)}
        return model.mean_log1p(model.transfer(X, library, source, target)).mean(0)

    base = under(0)
    for label in (1, 2):
        shift, true = under(label) - base, (truth[label] - truth[0]).mean(0)
        assert torch.corrcoef(torch.stack([shift, true]))[0, 1] > 0.9, (shift, true)
        error = (shift - true).abs()
        assert error.mean() < 0.3 and error.max() < 0.8, (shift, true)
    assert (under(1) - base)[KD].mean() < 0.5 * (truth[1] - truth[0]).mean(0)[KD].mean()
    zeros = torch.zeros(2, dtype=torch.long)
    params = model.decode_under(torch.zeros(2, 2), {"perturbation": zeros, "cell_type": zeros})
    expected = {
        "nb": {"mu", "theta", "scale", "log_mu", "log_theta"},
        "gaussian": {"mean", "log_var"},
    }
    assert set(params) == expected[likelihood]
    if likelihood == "nb":  # decoded at the default library 1e4: the mean is its proportions
        torch.testing.assert_close(params["mu"].sum(-1), torch.full((2,), TARGET_SUM))
