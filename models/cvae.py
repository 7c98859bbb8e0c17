"""Conditional VAE (seed 003): q(z | x, c) and p(x | z, c), where the condition c is the
perturbation label (the control label included) and, optionally, the cell type and batch.

Why it predicts perturbations: both networks see c (one-hot, into every layer: CountVAE's
``encode_covariates=True`` with the roles as covariates), so the latent z need not carry the
perturbation, the cell type or the batch: it is left with what varies among cells of one
condition (cycle, size, state). Changing c with z fixed then moves a cell across conditions.
Two ways to predict cells of perturbation p (``inference/cvae_predictor.py``):

- Mode A (prior): z ~ N(0, I) decoded under p. A population of p, unrelated to any control.
- Mode B (counterfactual): a real control cell encoded under the control label (its own
  cell type and batch) gives its posterior mean z, decoded under p (same cell type and
  batch). Each predicted cell keeps the identity of the control it came from.

Everything else is CountVAE's: the NB/ZINB likelihood of counts at the observed library size,
or the Gaussian one of log1p-normalized expression, and the KL annealing, which here is the
linear warm-up ``kl_warmup_steps`` (weight ``min(1, step / kl_warmup_steps)``): it keeps the
posterior from collapsing before the decoder has learnt to use z, and no further schedule
was needed (the stage's default warms up over the first 400 of 2,000 steps).

Default likelihood: NB on counts (``DEFAULT_LIKELIHOOD``), by a measurement on synthetic
perturbation data (``data_pipelines/synth.py``: 4,000 cells x 200 genes, 6 perturbations with
``pert_shift_scale=1``, 2 cell types; 25% of cells held out; 1,500 steps of 256 cells, 10
latents, 128 hidden, warm-up 400; 3 seeds each). Against the true shift of each perturbation
(held-out perturbed minus held-out control cells, mean log1p), Mode B's shift as the
prediction files hold it (cells SAMPLED from the likelihood at the controls' library sizes)
had Pearson r 0.957 with NB and 0.951 with the Gaussian, and the per-gene spread of the
sampled cells followed the real cells' closer (r of per-gene sd 0.983 against 0.967). The
Gaussian's decoder MEAN is the better point estimate (r 0.961 against NB's 0.943, whose
mean is log1p of the expected count, above the mean log1p by Jensen's gap), so
``likelihood="gaussian"`` is the choice for mean-only use; the data are NB-generated, which
favours NB, so the margin is small and the choice is a config key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .count_vae import TARGET_SUM, CountVAE, CountVAEConfig

__all__ = [
    "CONDITION_ROLES",
    "MODEL_CLASS",
    "DEFAULT_LIKELIHOOD",
    "ConditionalVAE",
    "conditioned_roles",
    "cvae_config",
]

# What a cvae run's model card names (``families.registry`` finds the family by it).
MODEL_CLASS = "latentcell.models.cvae.ConditionalVAE"
# The store roles a CVAE may condition on; the perturbation always, the others optionally.
CONDITION_ROLES = ("perturbation", "cell_type", "batch")
DEFAULT_LIKELIHOOD = "nb"


def cvae_config(
    n_genes: int, n_perturbations: int, n_cell_types: int = 0, n_batches: int = 0, **kwargs
) -> CountVAEConfig:
    """The CountVAEConfig of a CVAE: the perturbation (and cell type, when ``n_cell_types``)
    as covariates, the batch as CountVAE's batch, all fed to the encoder too."""
    keys, sizes = ("perturbation",), (n_perturbations,)
    if n_cell_types:
        keys, sizes = (*keys, "cell_type"), (*sizes, n_cell_types)
    return CountVAEConfig(
        n_genes=n_genes,
        covariate_keys=keys,
        n_covariate_categories=sizes,
        batch_key="batch" if n_batches else None,
        n_batches=n_batches,
        encode_covariates=True,
        **kwargs,
    )


def conditioned_roles(config: CountVAEConfig) -> tuple[str, ...]:
    """The roles a CVAE config conditions on, in ``CONDITION_ROLES`` order."""
    used = set(config.covariate_keys) | ({config.batch_key} if config.n_batches else set())
    return tuple(r for r in CONDITION_ROLES if r in used)


class ConditionalVAE(CountVAE):
    """A CountVAE whose encoder and decoder are conditioned on the perturbation label (and
    optionally cell type and batch); trains on the loader's batches unchanged, the role
    codes arriving as ``batch["obs"][role]``."""

    def __init__(self, config: CountVAEConfig) -> None:
        if "perturbation" not in config.covariate_keys or not config.encode_covariates:
            raise ValueError("a ConditionalVAE conditions encoder and decoder on 'perturbation'")
        super().__init__(config)

    @property
    def roles(self) -> tuple[str, ...]:
        return conditioned_roles(self.config)

    def _codes(self, codes: Mapping[str, torch.Tensor]):
        """(batch_index, covariates) for CountVAE from {role: (n,) or (1,) int64 codes}."""
        missing = [r for r in self.roles if r not in codes]
        if missing:
            raise ValueError(f"the CVAE conditions on {list(self.roles)}: codes lack {missing}")
        c = self.config
        covariates = {k: torch.as_tensor(codes[k]) for k in c.covariate_keys}
        return (torch.as_tensor(codes["batch"]) if c.n_batches else None), covariates

    def encode_under(
        self, counts: torch.Tensor, library: torch.Tensor, codes: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, c): (mean, log_var) of cells ``counts`` (n, G) at ``library`` (n,)."""
        batch_index, covariates = self._codes(codes)
        return self.encode(counts, library, batch_index, covariates)

    def decode_under(
        self,
        z: torch.Tensor,
        codes: Mapping[str, torch.Tensor],
        library: torch.Tensor | float = TARGET_SUM,
    ) -> dict[str, torch.Tensor]:
        """p(x | z, c): the likelihood's parameters (see ``CountVAE.decode``)."""
        batch_index, covariates = self._codes(codes)
        return self.decode(z, library, batch_index, covariates)

    @torch.no_grad()
    def sample_under(
        self,
        z: torch.Tensor,
        codes: Mapping[str, torch.Tensor],
        library: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Counts (n, G) drawn from p(x | z, c) at ``library`` (``CountVAE.sample``)."""
        batch_index, covariates = self._codes(codes)
        return self.sample(z, library, batch_index, covariates, generator=generator)

    @staticmethod
    def mean_log1p(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's mean on the log1p-normalized scale (n, G): the Gaussian's mean, or
        log1p of NB's expected proportions at 1e4 (independent of the library it ran at)."""
        if "mean" in params:
            return params["mean"]
        return torch.log1p(params["scale"] * TARGET_SUM)

    @torch.no_grad()
    def transfer(
        self,
        counts: torch.Tensor,
        library: torch.Tensor,
        source: Mapping[str, torch.Tensor],
        target: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Mode B: cells encoded under ``source`` codes (posterior mean), decoded under
        ``target`` codes at their own library sizes. Eval mode (no dropout), restored after."""
        was_training = self.training
        self.eval()
        try:
            z, _ = self.encode_under(counts, library, source)
            return self.decode_under(z, target, library)
        finally:
            self.train(was_training)
