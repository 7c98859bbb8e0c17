"""CountVAE: shapes, batch-dict handling (sparse, padding, conditioning), warm-up, training."""

from __future__ import annotations

import math

import pytest
import torch

from latentcell.models.count_vae import CountVAE, CountVAEConfig, VAEOutput
from latentcell.models.likelihoods import sample_nb

N_GENES = 12


def _counts(n: int, n_genes: int = N_GENES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(n, n_genes, generator=g) * 8.0
    return sample_nb(mu, torch.tensor(2.0), generator=g)


def _batch(X: torch.Tensor, is_pad=None, sparse: bool = False, **obs) -> dict:
    n = X.shape[0]
    return {
        "X": X.to_sparse_csr() if sparse else X,
        "library_size": X.sum(-1),
        "obs": {k: torch.as_tensor(v, dtype=torch.int64) for k, v in obs.items()},
        "row": torch.arange(n),
        "is_pad": torch.zeros(n, dtype=torch.bool) if is_pad is None else is_pad,
    }


def _model(likelihood: str = "nb", **kw) -> CountVAE:
    torch.manual_seed(0)
    cfg = CountVAEConfig(n_genes=N_GENES, n_latent=3, n_hidden=16, likelihood=likelihood, **kw)
    return CountVAE(cfg)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "gaussian"])
def test_shapes_and_output(likelihood):
    model = _model(likelihood, n_layers=2)
    X = _counts(7)
    out = model(_batch(X))
    assert isinstance(out, VAEOutput)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(out.reconstruction.item() + out.kl.item(), rel=1e-5)
    assert int(out.n_cells) == 7 and out.kl_weight == 1.0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    mean, log_var = model.encode(X)
    assert mean.shape == log_var.shape == (7, 3)
    params = model.decode(mean, X.sum(-1))
    expected = {
        "nb": {"scale", "mu", "theta", "log_mu", "log_theta"},
        "zinb": {"scale", "mu", "theta", "log_mu", "log_theta", "zi_logits"},
        "gaussian": {"mean", "log_var"},
    }[likelihood]
    assert set(params) == expected
    assert all(v.shape == (7, N_GENES) for v in params.values())
    if likelihood != "gaussian":
        torch.testing.assert_close(params["scale"].sum(-1), torch.ones(7))
        torch.testing.assert_close(params["log_mu"].exp(), params["mu"])
        torch.testing.assert_close(params["log_theta"].exp(), params["theta"])
        torch.testing.assert_close(params["mu"].sum(-1), X.sum(-1))
    assert model.elbo_per_cell(_batch(X)).shape == (7,)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "gaussian"])
def test_sample_gives_counts(likelihood):
    model = _model(likelihood)
    g = torch.Generator().manual_seed(0)
    s = model.sample(50, torch.full((50,), 200.0), generator=g)
    assert s.shape == (50, N_GENES)
    assert (s >= 0).all() and torch.equal(s, s.round()) and s.sum() > 0
    s2 = model.sample(torch.zeros(4, 3), 100.0)
    assert s2.shape == (4, N_GENES)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_sparse_and_dense_give_same_loss_and_gradients(likelihood):
    # Sparse batches take another path (sparse first matmul, lgamma at non-zeros only).
    model = _model(likelihood).eval()
    X = _counts(9)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(3)
        model.zero_grad()
        out = model(_batch(X, sparse=sparse))
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for dense_grad, sparse_grad in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(dense_grad, sparse_grad, rtol=1e-4, atol=1e-5)


def test_pad_cells_do_not_change_loss():
    model = _model().eval()
    X = _counts(10)
    is_pad = torch.tensor([False] * 6 + [True] * 4)
    garbage = X.clone()
    garbage[6:] = torch.randint(0, 10_000, (4, N_GENES)).float()
    torch.manual_seed(5)
    a = model(_batch(X, is_pad))
    torch.manual_seed(5)
    b = model(_batch(garbage, is_pad))
    torch.manual_seed(5)
    unpadded = model(_batch(X, torch.zeros(10, dtype=torch.bool)))
    torch.testing.assert_close(a.loss, b.loss)
    assert int(a.n_cells) == 6
    assert not torch.isclose(a.loss, unpadded.loss)
    # The padded loss is exactly the mean of the real cells' per-cell terms.
    torch.manual_seed(5)
    rec, kl = model._per_cell_terms(_batch(X))
    torch.testing.assert_close(a.loss, (rec + kl)[:6].mean())
    # Pad cells receive no gradient.
    Xg = X.clone().requires_grad_(True)
    model(_batch(Xg, is_pad)).loss.backward()
    assert (Xg.grad[6:] == 0).all() and (Xg.grad[:6] != 0).any()
    # An all-pad batch is a finite zero loss.
    all_pad = model(_batch(X, torch.ones(10, dtype=torch.bool)))
    assert all_pad.loss.item() == 0.0 and int(all_pad.n_cells) == 0


def test_kl_warmup_schedule():
    model = _model(kl_warmup_steps=100)
    assert [model.kl_weight(s) for s in (0, 25, 50, 100, 1000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    X = _counts(5)
    torch.manual_seed(0)
    out = model.eval()(_batch(X), step=50)
    assert out.kl_weight == 0.5
    assert out.loss.item() == pytest.approx(out.reconstruction.item() + 0.5 * out.kl.item())
    assert _model().kl_weight(0) == 1.0


def test_batch_conditioning():
    model = _model(batch_key="batch", n_batches=3).eval()
    z = torch.randn(4, 3)
    lib = torch.full((4,), 100.0)
    p0 = model.decode(z, lib, batch_index=torch.zeros(4, dtype=torch.int64))["mu"]
    p2 = model.decode(z, lib, batch_index=torch.full((4,), 2))["mu"]
    assert not torch.allclose(p0, p2)
    # forward reads the code from batch["obs"][batch_key].
    X = _counts(4)
    torch.manual_seed(0)
    a = model(_batch(X, batch=[0, 0, 0, 0])).loss
    torch.manual_seed(0)
    b = model(_batch(X, batch=[2, 2, 2, 2])).loss
    assert not torch.isclose(a, b)
    with pytest.raises(KeyError):
        model(_batch(X))
    with pytest.raises(ValueError):
        CountVAEConfig(n_genes=3, batch_key="batch")


def test_covariates_condition_the_model():
    model = _model(covariate_keys=("donor",), n_covariate_categories=(2,)).eval()
    X = _counts(4)
    torch.manual_seed(0)
    a = model(_batch(X, donor=[0, 0, 1, 1])).loss
    torch.manual_seed(0)
    b = model(_batch(X, donor=[1, 1, 0, 0])).loss
    assert not torch.isclose(a, b)


def _two_groups(n: int, n_genes: int, gen: torch.Generator):
    """NB counts from two groups that up-regulate opposite halves of the genes 2x."""
    labels = torch.arange(n) % 2
    base = torch.rand(n_genes, generator=gen) * 0.9 + 0.1
    program = torch.ones(2, n_genes)
    program[0, : n_genes // 2] = 2.0
    program[1, n_genes // 2 :] = 2.0
    props = base * program[labels]
    props = props / props.sum(-1, keepdim=True)
    library = torch.exp(torch.randn(n, generator=gen) * 0.3 + math.log(300.0))
    X = sample_nb(props * library[:, None], torch.tensor(5.0), generator=gen)
    return X, labels


def _centroid_accuracy(model, X_train, y_train, X_test, y_test) -> float:
    model.eval()
    with torch.no_grad():
        z_train, _ = model.encode(X_train)
        z_test, _ = model.encode(X_test)
    centroids = torch.stack([z_train[y_train == k].mean(0) for k in (0, 1)])
    return (torch.cdist(z_test, centroids).argmin(1) == y_test).float().mean().item()


def test_training_improves_heldout_elbo_and_separates_groups():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_genes = 40
    X, y = _two_groups(600, n_genes, gen)
    X_train, y_train, X_test, y_test = X[:400], y[:400], X[400:], y[400:]
    model = CountVAE(CountVAEConfig(n_genes=n_genes, n_latent=4, n_hidden=32, kl_warmup_steps=50))

    def heldout_elbo() -> float:
        g = torch.Generator().manual_seed(1)
        return model.elbo_per_cell(_batch(X_test), generator=g, n_samples=2).mean().item()

    elbo_before = heldout_elbo()
    acc_before = _centroid_accuracy(model, X_train, y_train, X_test, y_test)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        idx = torch.randint(0, X_train.shape[0], (128,), generator=gen)
        loss = model(_batch(X_train[idx]), step=step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.training  # elbo_per_cell restores the mode it found
    elbo_after = heldout_elbo()
    acc_after = _centroid_accuracy(model, X_train, y_train, X_test, y_test)
    # Untrained ~ -130 nats/cell, trained ~ -109: demand most of that gain.
    assert elbo_after > elbo_before + 12.0, (elbo_before, elbo_after)
    assert acc_after > 0.9, (acc_before, acc_after)
    assert acc_after > acc_before


@pytest.mark.parametrize("sparse", [False, True])
def test_marginal_log_likelihood_bounds_the_elbo(sparse):
    model = _model(n_layers=2)
    X = _counts(400, seed=3)
    batch = _batch(X, sparse=sparse)
    model.train()

    def mll(n_samples: int, seed: int = 0, **kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.marginal_log_likelihood(batch, n_samples=n_samples, generator=g, **kw)

    ll = mll(200)
    assert ll.shape == (400,) and torch.isfinite(ll).all()
    assert model.training  # the previous mode is restored
    torch.testing.assert_close(mll(200), ll)  # same generator seed, same estimate
    assert not torch.equal(mll(200, seed=1), ll)
    # chunking the samples only changes how they are computed
    torch.testing.assert_close(mll(200, max_elements=5 * 400 * N_GENES), ll, rtol=0, atol=2e-3)

    g = torch.Generator().manual_seed(1)
    elbo = model.elbo_per_cell(batch, generator=g, n_samples=50)
    # importance sampling tightens the bound: log p(x) >= IWAE(K) >= ELBO, per cell on average
    assert ll.mean() > elbo.mean() + 0.05, (ll.mean(), elbo.mean())
    # K = 1 is an unbiased estimate of the ELBO (analytic KL): equal means up to MC noise
    one = torch.stack([mll(1, seed=s) for s in range(10)])
    se = one.std() / math.sqrt(one.numel())
    assert abs(one.mean() - elbo.mean()) < 4 * se + 0.02, (one.mean(), elbo.mean(), se)
    # the estimate grows (in expectation) with K
    assert mll(10).mean() < ll.mean()


def test_marginal_log_likelihood_with_batch_conditioning_and_pads():
    model = _model(batch_key="batch", n_batches=2)
    X = _counts(6, seed=4)
    is_pad = torch.tensor([False] * 5 + [True])
    g = torch.Generator().manual_seed(0)
    ll = model.marginal_log_likelihood(
        _batch(X, is_pad=is_pad, batch=[0, 1, 0, 1, 0, 0]), n_samples=7, generator=g
    )
    assert ll.shape == (6,) and torch.isfinite(ll).all()
    single = model.marginal_log_likelihood(
        _batch(X[:1], batch=[0]), n_samples=7, generator=torch.Generator().manual_seed(5)
    )
    assert single.shape == (1,)
    with pytest.raises(ValueError, match="n_samples"):
        model.marginal_log_likelihood(_batch(X, batch=[0] * 6), n_samples=0)
