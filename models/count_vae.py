"""Count VAE (scVI-style): a variational autoencoder whose decoder is a count likelihood.

The encoder sees normalize_total + log1p expression (so sequencing depth does not dominate the
latent space); the decoder predicts gene *proportions* and multiplies them by the observed
library size, so depth is explained by the likelihood rather than by ``z``. Batch (and other
categorical covariates) are one-hot inputs of both networks, letting the decoder absorb
technical effects that the latent space then does not need to encode.

The module only consumes the loader's batch dict (see
``latentcell.data_pipelines.batches``) and returns a ``VAEOutput``; the generic trainer calls
``model(batch, step=global_step)`` and backpropagates ``output.loss`` without knowing anything
else about the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentcell.models.likelihoods import (
    csr_row_indices,
    gaussian_log_prob,
    nb_log_prob_rows,
    sample_nb,
    sample_zinb,
    zinb_log_prob_rows,
)

__all__ = ["CountVAE", "CountVAEConfig", "LatentMeanEncoder", "VAEOutput"]

LIKELIHOODS = ("nb", "zinb", "gaussian")
DISPERSIONS = ("gene",)
# normalize_total target for the encoder input (and the Gaussian likelihood's target space).
TARGET_SUM = 1e4
# Floor on the posterior variance: keeps log_var finite and the KL well conditioned.
_MIN_VAR = 1e-4


@dataclass(frozen=True)
class CountVAEConfig:
    """Architecture and objective of a ``CountVAE``; frozen so it can be logged and hashed.

    batch_key: ``batch["obs"]`` key holding the batch code (e.g. the role name ``"batch"``);
        ``n_batches`` is then the number of codes (one-hot width).
    covariate_keys / n_covariate_categories: further categorical ``obs`` keys conditioned on
        exactly like the batch (one-hot into encoder and decoder).
    encode_covariates: also feed the batch/covariate one-hots to the encoder. Off by default
        (as in scVI): then ``encode`` needs only counts, so the latent space can be computed
        for cells of unseen batches and the encoder serves from a single input.
    kl_warmup_steps: the KL weight rises linearly from 0 at step 0 to 1 at this step (0: no
        warm-up), which stops the posterior from collapsing to the prior early in training.
    dispersion: only ``"gene"`` (one learned inverse dispersion per gene) for now.
    """

    n_genes: int
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    likelihood: str = "nb"
    dropout: float = 0.1
    batch_key: str | None = None
    n_batches: int = 0
    covariate_keys: tuple[str, ...] = ()
    n_covariate_categories: tuple[int, ...] = ()
    encode_covariates: bool = False
    kl_warmup_steps: int = 0
    dispersion: str = "gene"

    def __post_init__(self) -> None:
        if self.n_genes < 1 or self.n_latent < 1 or self.n_hidden < 1 or self.n_layers < 1:
            raise ValueError("n_genes, n_latent, n_hidden and n_layers must be >= 1")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {self.dispersion!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if (self.batch_key is None) != (self.n_batches == 0):
            raise ValueError("batch_key and n_batches > 0 must be given together")
        if self.n_batches < 0:
            raise ValueError(f"n_batches must be >= 0, got {self.n_batches}")
        if len(self.covariate_keys) != len(self.n_covariate_categories):
            raise ValueError("covariate_keys and n_covariate_categories must have equal length")
        if any(n < 1 for n in self.n_covariate_categories):
            raise ValueError("every covariate needs at least one category")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")

    @property
    def n_conditions(self) -> int:
        """Width of the concatenated one-hot conditioning vector."""
        return self.n_batches + sum(self.n_covariate_categories)


@dataclass
class VAEOutput:
    """What ``CountVAE.forward`` returns to the trainer.

    loss: scalar to backpropagate, mean over non-pad cells of
        ``reconstruction + kl_weight * kl``.
    reconstruction / kl: detached per-cell means over non-pad cells (for logging).
    kl_weight: the warm-up weight applied at this step.
    n_cells: number of non-pad cells as a 0-dim int64 tensor (no host sync; use it to weight
        averages across processes).
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_weight: float
    n_cells: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]:
        """Per-cell means the trainer logs (averaged over processes, weighted by n_cells)."""
        return {
            "loss": self.loss.detach(),
            "reconstruction": self.reconstruction,
            "kl": self.kl,
            "elbo": -(self.reconstruction + self.kl),
            "kl_weight": self.kl_weight,
        }


class LatentMeanEncoder(nn.Module):
    """counts ``(n, n_genes)`` -> posterior mean ``(n, n_latent)``: the VAE's serving entry
    point (MLflow model, ONNX encoder). Needs ``encode_covariates=False`` (the default)."""

    def __init__(self, vae: CountVAE) -> None:
        super().__init__()
        if vae.config.encode_covariates:
            raise ValueError("a covariate-conditioned encoder needs more than counts to serve")
        self.vae = vae

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(counts)[0]


def _mlp(n_in: int, n_cond: int, n_hidden: int, n_layers: int, dropout: float) -> nn.ModuleList:
    # Each layer sees the conditioning one-hot again (scVI's "deep injection"), so covariates
    # cannot be washed out by the first layer. LayerNorm rather than BatchNorm: per-cell, so pad
    # cells and batch composition never leak into other cells' outputs.
    layers = nn.ModuleList()
    for i in range(n_layers):
        layers.append(
            nn.Sequential(
                nn.Linear((n_in if i == 0 else n_hidden) + n_cond, n_hidden),
                nn.LayerNorm(n_hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
            )
        )
    return layers


def _run_mlp(layers: nn.ModuleList, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        h = layer(h if cond is None else torch.cat([h, cond], dim=-1))
    return h


def _dense(X: torch.Tensor) -> torch.Tensor:
    """Dense float view of ``X`` (sparse CSR/COO batches are densified on their device)."""
    if X.layout != torch.strided:
        X = X.to_dense()
    return X.float() if not X.is_floating_point() else X


def _row_sums(X: torch.Tensor) -> torch.Tensor:
    if X.layout == torch.sparse_csr:
        rows = csr_row_indices(X)
        return torch.zeros(X.shape[0], device=X.device).index_add(0, rows, X.values().float())
    return _dense(X).sum(-1)


def normalize_log1p(X: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
    """``log1p(X / library * 1e4)``; empty cells (library 0) map to zeros instead of nan.
    A sparse CSR ``X`` stays sparse (log1p(0) = 0, so only stored values change)."""
    if X.layout == torch.sparse_csr:
        crow, cols, values = X.crow_indices(), X.col_indices(), X.values().float()
        lib = library_size.float().clamp_min(1.0)
        rows = csr_row_indices(X)
        normalized = torch.log1p(values / lib[rows] * TARGET_SUM)
        return torch.sparse_csr_tensor(crow, cols, normalized, X.shape)
    lib = library_size.to(X.dtype).clamp_min(1.0).unsqueeze(-1)
    return torch.log1p(X / lib * TARGET_SUM)


class CountVAE(nn.Module):
    """Variational autoencoder for raw counts with NB, ZINB or Gaussian observations."""

    def __init__(self, config: CountVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        n_enc_cond = c.n_conditions if c.encode_covariates else 0
        self.encoder = _mlp(c.n_genes, n_enc_cond, c.n_hidden, c.n_layers, c.dropout)
        self.z_mean = nn.Linear(c.n_hidden, c.n_latent)
        self.z_var = nn.Linear(c.n_hidden, c.n_latent)
        self.decoder = _mlp(c.n_latent, c.n_conditions, c.n_hidden, c.n_layers, 0.0)
        # "gene" dispersion / Gaussian variance: one free parameter per gene, shared by cells.
        self.px_mean = nn.Linear(c.n_hidden, c.n_genes)
        if c.likelihood == "gaussian":
            self.px_log_var = nn.Parameter(torch.zeros(c.n_genes))
        else:
            self.px_log_theta = nn.Parameter(torch.zeros(c.n_genes))
        if c.likelihood == "zinb":
            self.px_zi_logits = nn.Linear(c.n_hidden, c.n_genes)

    # -- conditioning -------------------------------------------------------------------------

    def _condition(
        self,
        n: int,
        device: torch.device,
        batch_index: torch.Tensor | None,
        covariates: Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor | None:
        c = self.config
        if c.n_conditions == 0:
            return None
        parts = []
        if c.n_batches:
            if batch_index is None:
                raise ValueError(
                    f"the model is batch-conditioned: pass batch_index ({c.batch_key})"
                )
            parts.append(F.one_hot(batch_index.long().reshape(-1), c.n_batches))
        for key, n_cat in zip(c.covariate_keys, c.n_covariate_categories, strict=True):
            if covariates is None or key not in covariates:
                raise ValueError(f"covariate {key!r} is required by the model config")
            parts.append(F.one_hot(covariates[key].long().reshape(-1), n_cat))
        cond = torch.cat(parts, dim=-1).to(device=device, dtype=torch.float32)
        if cond.shape[0] != n:
            cond = cond.expand(n, -1)  # a single code broadcast over all cells
        return cond

    def _batch_inputs(self, batch: Mapping):
        """(X as dense or sparse CSR, float32 library sizes, batch codes, covariates)."""
        X = batch["X"]
        if X.layout not in (torch.strided, torch.sparse_csr):
            X = _dense(X)
        library_size = batch.get("library_size")
        if library_size is None:
            library_size = _row_sums(X)
        library_size = library_size.to(device=X.device, dtype=torch.float32)
        return (X, library_size, *self._batch_conditions(batch))

    def _batch_conditions(self, batch: Mapping) -> tuple[torch.Tensor | None, dict | None]:
        c = self.config
        obs = batch.get("obs", {})
        missing = [k for k in (c.batch_key, *c.covariate_keys) if k is not None and k not in obs]
        if missing:
            raise KeyError(f"batch['obs'] lacks {missing} required by the model config")
        batch_index = obs[c.batch_key] if c.batch_key is not None else None
        covariates = {k: obs[k] for k in c.covariate_keys} if c.covariate_keys else None
        return batch_index, covariates

    # -- networks -----------------------------------------------------------------------------

    def encode(
        self,
        X: torch.Tensor,
        library_size: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        covariates: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``q(z | x)`` as ``(mean, log_var)``, each ``(n, n_latent)``.

        ``library_size`` defaults to the row sums of ``X`` (the loader's value when the store
        holds every gene).
        """
        dtype = self.z_mean.weight.dtype  # bf16 under DeepSpeed's bf16 mode
        if X.layout != torch.sparse_csr or dtype != torch.float32:
            X = _dense(X)
        if library_size is None:
            library_size = _row_sums(X)
        # Normalized on the stored values only, then densified: on CPU a dense first matmul
        # beats a sparse one (whose weight gradient needs a sorted CSR transpose).
        h = normalize_log1p(X, library_size)
        h = (h.to_dense() if h.layout != torch.strided else h).to(dtype)
        cond = None
        if self.config.encode_covariates:
            cond = self._condition(X.shape[0], X.device, batch_index, covariates)
            cond = None if cond is None else cond.to(dtype)
        h = _run_mlp(self.encoder, h, cond)
        mean = self.z_mean(h).float()
        log_var = torch.log(F.softplus(self.z_var(h).float()) + _MIN_VAR)
        return mean, log_var

    def decode(
        self,
        z: torch.Tensor,
        library_size: torch.Tensor | float,
        batch_index: torch.Tensor | None = None,
        covariates: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Likelihood parameters of ``p(x | z)``.

        NB: ``scale`` (gene proportions, rows sum to 1), ``mu = scale * library_size`` and
        ``theta``; ZINB adds ``zi_logits``; Gaussian: ``mean`` and ``log_var`` of the
        log1p-normalized expression.
        """
        c = self.config
        dtype = self.px_mean.weight.dtype
        cond = self._condition(z.shape[0], z.device, batch_index, covariates)
        h = _run_mlp(self.decoder, z.to(dtype), None if cond is None else cond.to(dtype))
        # Likelihood parameters in fp32 whatever the weights' precision: lgamma and softmax
        # over thousands of genes lose too much in bf16.
        if c.likelihood == "gaussian":
            log_var = self.px_log_var.float().expand(z.shape[0], -1)
            return {"mean": self.px_mean(h).float(), "log_var": log_var}
        log_scale = torch.log_softmax(self.px_mean(h).float(), dim=-1)
        scale = torch.exp(log_scale)
        lib = torch.as_tensor(library_size, dtype=scale.dtype, device=scale.device)
        lib = lib.reshape(-1, 1) if lib.ndim else lib
        log_theta = self.px_log_theta.float().expand(z.shape[0], -1)
        params = {
            "scale": scale,
            "mu": scale * lib,
            "theta": torch.exp(log_theta),
            # log-space forms for the likelihood: log_softmax is exact where softmax underflows
            "log_mu": log_scale + torch.log(lib.clamp_min(torch.finfo(scale.dtype).tiny)),
            "log_theta": log_theta,
        }
        if c.likelihood == "zinb":
            params["zi_logits"] = self.px_zi_logits(h).float()
        return params

    def log_likelihood(
        self, X: torch.Tensor, library_size: torch.Tensor, params: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per-cell ``log p(x | z)`` summed over genes, ``(n,)``. ``X`` may stay sparse CSR
        for NB/ZINB (the lgamma terms are then evaluated at the non-zeros only)."""
        c = self.config
        if c.likelihood == "nb":
            return nb_log_prob_rows(X, params["log_mu"], params["log_theta"])
        if c.likelihood == "zinb":
            return zinb_log_prob_rows(X, params["log_mu"], params["log_theta"], params["zi_logits"])
        X = _dense(X)
        lp = gaussian_log_prob(normalize_log1p(X, library_size), params["mean"], params["log_var"])
        return lp.sum(-1)

    def kl_weight(self, step: int | torch.Tensor = 0) -> float:
        """Linear KL warm-up: ``min(1, step / kl_warmup_steps)`` (1 without warm-up)."""
        if self.config.kl_warmup_steps <= 0:
            return 1.0
        return float(min(1.0, max(0.0, float(step) / self.config.kl_warmup_steps)))

    def _per_cell_terms(
        self, batch: Mapping, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # (-log p(x|z), KL(q(z|x) || N(0, I))) per cell, single reparameterized sample.
        X, library_size, batch_index, covariates = self._batch_inputs(batch)
        mean, log_var = self.encode(X, library_size, batch_index, covariates)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * eps
        params = self.decode(z, library_size, batch_index, covariates)
        reconstruction = -self.log_likelihood(X, library_size, params)
        kl = 0.5 * (torch.exp(log_var) + mean**2 - 1.0 - log_var).sum(-1)
        return reconstruction, kl

    # -- trainer interface --------------------------------------------------------------------

    def forward(self, batch: Mapping, step: int | torch.Tensor = 0) -> VAEOutput:
        """Negative ELBO of a loader batch, averaged over its non-pad cells.

        Pad cells are still run through the networks (static shapes, no host sync) and then
        masked out of every reduction.
        """
        reconstruction, kl = self._per_cell_terms(batch)
        is_pad = batch.get("is_pad")
        if is_pad is None:
            keep = torch.ones_like(reconstruction, dtype=torch.bool)
        else:
            keep = ~is_pad.to(device=reconstruction.device, dtype=torch.bool)
        n_cells = keep.sum()
        denom = n_cells.clamp_min(1).to(reconstruction.dtype)
        zero = torch.zeros((), dtype=reconstruction.dtype, device=reconstruction.device)
        rec_mean = torch.where(keep, reconstruction, zero).sum() / denom
        kl_mean = torch.where(keep, kl, zero).sum() / denom
        weight = self.kl_weight(step)
        return VAEOutput(
            loss=rec_mean + weight * kl_mean,
            reconstruction=rec_mean.detach(),
            kl=kl_mean.detach(),
            kl_weight=weight,
            n_cells=n_cells,
        )

    @torch.no_grad()
    def elbo_per_cell(
        self, batch: Mapping, generator: torch.Generator | None = None, n_samples: int = 1
    ) -> torch.Tensor:
        """Held-out ELBO ``log p(x|z) - KL`` (KL weight 1) per cell, ``(n,)``, higher is better.

        Runs in eval mode (no dropout; the previous mode is restored) and averages
        ``n_samples`` reparameterized draws. Rows are aligned with the batch, pad cells
        included: drop them with ``batch["is_pad"]`` before averaging.
        """
        was_training = self.training
        self.eval()
        try:
            total = None
            for _ in range(n_samples):
                reconstruction, kl = self._per_cell_terms(batch, generator=generator)
                elbo = -reconstruction - kl
                total = elbo if total is None else total + elbo
            return total / n_samples
        finally:
            self.train(was_training)

    @torch.no_grad()
    def marginal_log_likelihood(
        self,
        batch: Mapping,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        max_elements: int = 2**23,
    ) -> torch.Tensor:
        """Importance-sampled ``log p(x)`` per cell, ``(n,)``, with ``q(z | x)`` as proposal:
        ``logsumexp_k [log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x)] - log K``.

        A lower bound of ``log p(x)`` in expectation that tightens as ``K = n_samples`` grows
        (``K = 1`` estimates the ELBO without bias); the estimator of scvi-tools'
        ``get_marginal_ll``, so the two are comparable. Eval mode (no dropout; the previous
        mode is restored), pad rows included (drop them with ``batch["is_pad"]``). Samples are
        decoded in chunks of at most ``max_elements`` likelihood entries (samples x cells x
        genes) to bound memory.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        X, library_size, batch_index, covariates = self._batch_inputs(batch)
        n = X.shape[0]

        def tile(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
            # per-cell codes repeated for k samples; a single broadcast code stays as is
            return t if t is None or t.numel() != n else t.reshape(-1).repeat(k)

        def repeat_rows(k: int) -> torch.Tensor:
            # X stacked k times (sample-major), a sparse CSR X stays sparse
            if k == 1 or X.layout != torch.sparse_csr:
                return X if k == 1 else X.repeat(k, 1)
            crow, nnz = X.crow_indices(), X.values().shape[0]
            offsets = torch.arange(k, device=X.device, dtype=crow.dtype) * nnz
            rows = (crow[:-1].unsqueeze(0) + offsets.unsqueeze(1)).reshape(-1)
            crow_k = torch.cat([rows, crow[-1:] + offsets[-1]])
            return torch.sparse_csr_tensor(
                crow_k, X.col_indices().repeat(k), X.values().repeat(k), (k * n, X.shape[1])
            )

        was_training = self.training
        self.eval()
        try:
            mean, log_var = self.encode(X, library_size, batch_index, covariates)
            std = torch.exp(0.5 * log_var)
            chunk = max(1, min(n_samples, max_elements // max(1, n * self.config.n_genes)))
            log_w = []
            for start in range(0, n_samples, chunk):
                k = min(chunk, n_samples - start)
                eps = torch.randn(
                    (k, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype
                )
                z = mean + std * eps
                lib_k = library_size.repeat(k)
                cov_k = (
                    None if covariates is None else {c: tile(v, k) for c, v in covariates.items()}
                )
                params = self.decode(z.reshape(k * n, -1), lib_k, tile(batch_index, k), cov_k)
                log_px = self.log_likelihood(repeat_rows(k), lib_k, params).reshape(k, n)
                # log N(z; 0, I) - log q(z | x), q written in terms of eps; the 2 pi terms cancel
                log_pz = -0.5 * (z**2).sum(-1)
                log_qz = -0.5 * (eps**2 + log_var).sum(-1)
                log_w.append(log_px + log_pz - log_qz)
            log_w = torch.cat(log_w, dim=0)
            return torch.logsumexp(log_w, dim=0) - log_w.new_tensor(float(n_samples)).log()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(
        self,
        n_or_z: int | torch.Tensor,
        library_size: torch.Tensor | float,
        batch_index: torch.Tensor | None = None,
        covariates: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate counts ``(n, n_genes)``: ``z`` (given, or ``n`` prior draws) decoded and
        sampled from the likelihood.

        Gaussian models sample log1p-normalized expression and map it back to counts at
        ``library_size`` (rounded, clipped at 0), so every likelihood returns counts.
        """
        param = next(self.parameters())
        if isinstance(n_or_z, int):
            z = torch.randn(
                (n_or_z, self.config.n_latent),
                generator=generator,
                device=param.device,
                dtype=param.dtype,
            )
        else:
            z = n_or_z.to(device=param.device, dtype=param.dtype)
        was_training = self.training
        self.eval()
        try:
            params = self.decode(z, library_size, batch_index, covariates)
        finally:
            self.train(was_training)
        if self.config.likelihood == "nb":
            return sample_nb(params["mu"], params["theta"], generator=generator)
        if self.config.likelihood == "zinb":
            return sample_zinb(
                params["mu"], params["theta"], params["zi_logits"], generator=generator
            )
        mean, log_var = params["mean"], params["log_var"]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        x_norm = mean + torch.exp(0.5 * log_var) * noise
        lib = torch.as_tensor(library_size, dtype=mean.dtype, device=mean.device)
        lib = lib.reshape(-1, 1) if lib.ndim else lib
        return torch.round(torch.expm1(x_norm).clamp_min(0.0) * lib / TARGET_SUM)
