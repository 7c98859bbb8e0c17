"""scvi-tools' SCVI as the reference for the count VAE benchmark.

``train_scvi`` trains SCVI with the same sizes as ``latentcell.models.count_vae.CountVAE`` and
times it; ``scvi_heldout_metrics`` scores held-out cells with scvi's own evaluation APIs, in the
units ``CountVAE.elbo_per_cell`` uses (per-cell nats, higher is better).

scvi-tools is an optional, heavy dependency (it lives in the ``.venv-bench`` environment, not
in the project's requirements), so it is imported inside the functions: this module imports
without it. Checked against scvi-tools 1.4.2 (lightning 2.6, torch 2.13).

How the SCVI model is made to match ``CountVAE`` (``ReferenceSizes`` defaults = CountVAEConfig
defaults):

* ``n_hidden``, ``n_latent``, ``n_layers``, ``dropout_rate`` (encoder only; SCVI's decoder has
  no dropout, like ours), ``gene_likelihood="nb"``, ``dispersion="gene"``, no batch key, and
  ``use_observed_lib_size=True`` (decoder mean = softmax proportions x observed library size).
* ``use_layer_norm="both", use_batch_norm="none"``: LayerNorm in encoder and decoder, as ours
  (SCVI's default is BatchNorm in both and no LayerNorm).

Differences that remain (SCVI defaults, kept on purpose):

* Encoder input: SCVI encodes ``log1p(x)`` of the raw counts, ours ``log1p(normalize_total)``.
* Posterior variance: SCVI uses ``exp(.) + 1e-4``, ours ``softplus(.) + 1e-4``.
* SCVI also builds an (unused, gradient-free) library-size encoder with observed library size.
* Optimizer: SCVI's ``Adam`` (L2 ``weight_decay``, ``eps=0.01`` by default), constant lr;
  ``ReferenceSizes.optimizer`` / ``optimizer_eps`` can switch to ``AdamW`` / another eps.
* Both likelihoods are the full NB log-pmf including the ``-lgamma(x + 1)`` constant
  (``scvi.distributions._negative_binomial.log_nb_positive``), so nats are comparable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["ReferenceSizes", "scvi_heldout_metrics", "train_scvi"]


@dataclass(frozen=True)
class ReferenceSizes:
    """Sizes and optimisation settings shared by the SCVI reference and our count VAE.

    weight_decay: scvi's own default is 1e-6; 0.0 here. With ``optimizer="Adam"`` it is an L2
        penalty folded into the gradient (torch Adam), with ``"AdamW"`` decoupled decay.
    kl_warmup_steps: linear KL weight ``step / kl_warmup_steps`` over optimizer steps (scvi's
        ``n_steps_kl_warmup``; epoch-based warm-up is switched off); 0 means weight 1 throughout.
    optimizer / optimizer_eps: scvi's training-plan optimizer and its ``eps`` (scvi's default
        0.01, not torch's 1e-8).
    """

    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    kl_warmup_steps: int = 0
    dropout: float = 0.1
    optimizer: str = "Adam"
    optimizer_eps: float = 0.01


def train_scvi(
    adata_train,
    sizes: ReferenceSizes,
    max_steps: int,
    seed: int,
    *,
    skip_steps: int = 10,
) -> dict:
    """Train SCVI on raw counts in ``adata_train.X`` for exactly ``max_steps`` optimizer steps.

    ``scvi.settings.seed = seed`` seeds python, numpy and torch (lightning's
    ``seed_everything``). ``SCVI.setup_anndata`` registers ``adata_train`` in place (adds
    ``_scvi_*`` obs columns and uns entries). Torch threads are left as the caller set them.

    Training: all cells train (``train_size=1.0``, no validation set, validation never runs),
    no early stopping, checkpointing, progress bar or model summary, ``accelerator="cpu"``;
    minibatches of ``sizes.batch_size`` reshuffled every epoch, the last partial batch kept
    (scvi's default). Exactly ``max_steps`` steps: lightning's ``max_steps`` stops the fit
    (``max_epochs`` is set past it, so it never stops first); the count is checked by a callback
    and returned as ``steps``.

    Returns:
        model: the trained ``scvi.model.SCVI`` (module in eval mode).
        seconds: wall time of the ``model.train(...)`` call only: Trainer and data-splitter
            construction, lightning start-up, the ``max_steps`` steps (data loading, forward,
            backward, optimizer) with scvi's per-epoch metric logging, and the history update.
            ``setup_anndata`` and the model construction are excluded.
        cells_per_s: cells in all training minibatches / ``seconds``.
        seconds_steady / cells_per_s_steady: from the start of step ``skip_steps`` to the start
            of the last step (each interval = one step plus loading the next batch), and the
            cells of those steps; excludes start-up and the first ``skip_steps`` steps. NaN if
            ``max_steps <= skip_steps + 1``.
        startup_seconds: from the ``model.train`` call to the start of the first step.
        steps: optimizer steps actually run (== ``max_steps``); cells: cells processed.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    import lightning.pytorch as pl
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata_train)
    model = scvi.model.SCVI(
        adata_train,
        n_hidden=sizes.n_hidden,
        n_latent=sizes.n_latent,
        n_layers=sizes.n_layers,
        dropout_rate=sizes.dropout,
        dispersion="gene",
        gene_likelihood="nb",
        use_observed_lib_size=True,
        use_layer_norm="both",
        use_batch_norm="none",
    )

    class _StepClock(pl.Callback):
        """Timestamps every step start and the last step end; counts cells per step."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.cells: list[int] = []
            self.last_end = math.nan

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())
            self.cells.append(int(batch[scvi.REGISTRY_KEYS.X_KEY].shape[0]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.last_end = time.perf_counter()

    n_cells = adata_train.n_obs
    steps_per_epoch = math.ceil(n_cells / sizes.batch_size)
    max_epochs = math.ceil(max_steps / steps_per_epoch) + 1
    warmup = sizes.kl_warmup_steps if sizes.kl_warmup_steps > 0 else None
    clock = _StepClock()
    t0 = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        validation_size=None,
        batch_size=sizes.batch_size,
        early_stopping=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        check_val_every_n_epoch=None,
        callbacks=[clock],
        plan_kwargs={
            "optimizer": sizes.optimizer,
            "lr": sizes.lr,
            "weight_decay": sizes.weight_decay,
            "eps": sizes.optimizer_eps,
            "n_steps_kl_warmup": warmup,
            "n_epochs_kl_warmup": None,
            "reduce_lr_on_plateau": False,
        },
    )
    seconds = time.perf_counter() - t0
    steps = len(clock.starts)
    if steps != max_steps or model.trainer.global_step != max_steps:
        raise RuntimeError(
            f"SCVI ran {steps} steps (global_step {model.trainer.global_step}), "
            f"not max_steps={max_steps}"
        )
    cells = sum(clock.cells)
    if steps > skip_steps + 1:
        seconds_steady = clock.starts[-1] - clock.starts[skip_steps]
        cells_steady = sum(clock.cells[skip_steps:-1])
        cells_per_s_steady = cells_steady / seconds_steady
    else:
        seconds_steady = cells_per_s_steady = math.nan
    return {
        "model": model,
        "seconds": seconds,
        "cells_per_s": cells / seconds,
        "seconds_steady": seconds_steady,
        "cells_per_s_steady": cells_per_s_steady,
        "startup_seconds": clock.starts[0] - t0,
        "steps": steps,
        "cells": cells,
    }


def scvi_heldout_metrics(
    model,
    adata_test,
    n_mc: int = 1,
    seed: int = 0,
    *,
    marginal_ll_samples: int = 100,
    samples_per_pass: int = 25,
    batch_size: int = 256,
) -> dict:
    """Per-cell averages on held-out cells, in nats, higher is better (so negative numbers).

    ``adata_test`` must hold raw counts with the training genes in the same order; scvi
    registers it in place from the training setup. The module runs in eval mode (no dropout).
    Every scvi call is made with ``return_mean=False`` (one value per cell) and averaged here
    over all cells, so partial minibatches are weighted correctly (``get_marginal_ll``'s own
    ``return_mean=True`` is a mean of per-minibatch means).

    What scvi-tools 1.4.2 returns (from its source, ``scvi/model/base/_vaemixin.py`` and
    ``_log_likelihood.py``):

    * ``get_reconstruction_error(return_mean=False)`` -> ``{"reconstruction_loss": t}`` with
      ``t = -log p(x | z)`` per cell (NB summed over genes, one posterior sample ``z ~ q``): a
      positive NLL despite the docstring's "higher is better". Here
      ``reconstruction_ll = -mean(t)``.
    * ``get_elbo(return_mean=False)`` -> ``-(reconstruction_loss + KL(q(z|x) || N(0, I)))`` per
      cell (``compute_elbo`` sums the NLL and the analytic KL; the KL of the library is 0 with
      the observed library size): already the ELBO, used as is. Each of the ``n_mc`` repeats
      seeds torch identically before both calls, so both see the same ``z`` draws and
      ``kl = reconstruction_ll - elbo`` is the exact analytic KL (also returned).
    * ``get_marginal_ll(n_mc_samples=K, return_mean=False)`` -> per cell
      ``logsumexp_k[log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K`` with ``z_k ~ q(z|x)``:
      importance-sampled ``log p(x)``, used as is (``K = marginal_ll_samples``, computed
      ``samples_per_pass`` draws per forward pass to bound memory). If it raises, the result
      has ``marginal_ll = nan`` and ``marginal_ll_error``.

    Randomness is drawn inside ``torch.random.fork_rng``: the caller's torch RNG is untouched.

    Returns ``reconstruction_ll``, ``elbo``, ``kl``, ``marginal_ll``, ``n_cells`` and the wall
    times ``seconds_elbo`` (all ``n_mc`` repeats of both calls) and ``marginal_ll_seconds``.
    """
    import torch

    if n_mc < 1:
        raise ValueError(f"n_mc must be >= 1, got {n_mc}")
    was_training = model.module.training
    model.module.eval()
    try:
        rec_ll = elbo = 0.0
        t0 = time.perf_counter()
        for i in range(n_mc):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                nll = model.get_reconstruction_error(
                    adata_test, batch_size=batch_size, return_mean=False
                )["reconstruction_loss"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                cell_elbo = model.get_elbo(adata_test, batch_size=batch_size, return_mean=False)
            rec_ll += -float(nll.double().mean()) / n_mc
            elbo += float(cell_elbo.double().mean()) / n_mc
        seconds_elbo = time.perf_counter() - t0

        out = {
            "reconstruction_ll": rec_ll,
            "elbo": elbo,
            "kl": rec_ll - elbo,
            "n_cells": int(adata_test.n_obs),
            "seconds_elbo": seconds_elbo,
        }
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                mll = model.get_marginal_ll(
                    adata_test,
                    n_mc_samples=marginal_ll_samples,
                    batch_size=batch_size,
                    return_mean=False,
                    n_mc_samples_per_pass=min(samples_per_pass, marginal_ll_samples),
                )
            out["marginal_ll"] = float(mll.double().mean())
        except Exception as exc:  # reported, not raised: the other metrics stand on their own
            out["marginal_ll"] = math.nan
            out["marginal_ll_error"] = f"{type(exc).__name__}: {exc}"
        out["marginal_ll_seconds"] = time.perf_counter() - t0
        return out
    finally:
        model.module.train(was_training)
