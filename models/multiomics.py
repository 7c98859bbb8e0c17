"""A joint RNA + protein VAE (CITE-seq; seed 001): two count VAEs that share one latent space,
so either modality alone can place a cell in it, and a cell measured in one modality can be
decoded into the other (translation).

Each modality keeps its own ``CountVAE`` (``count_vae.py``): an encoder of its log1p-normalized
counts into a posterior q_m(z | x_m) and a decoder of proportions scaled by the observed
library, with a count likelihood: NB or ZINB for RNA, NB for the protein (antibody-derived
tag) counts. Nothing about the likelihoods is rewritten here; the joint model only decides
what is decoded from where and how the two posteriors are tied:

- self reconstruction: RNA from a draw of q_rna, protein from a draw of q_protein;
- cross reconstruction (``cross_reconstruction``, on by default): RNA from a draw of
  q_protein and protein from a draw of q_rna. This is translation itself, trained directly;
  without it translation relies on the alignment alone;
- a KL term per posterior against N(0, I) (warmed up over ``kl_warmup_steps``);
- an alignment term between the posteriors of one cell (``alignment``): the symmetric KL
  (the mean of KL(q_rna || q_protein) and KL(q_protein || q_rna)), which also asks the two
  to be equally certain, or the squared distance between their means.

Translation (``translate``) encodes with one modality's posterior mean and decodes the
other's proportions; counts follow at whatever library the caller chooses (the translator
uses the training cells' median), and log1p(proportion * 1e4) is the normalized expression,
whatever that library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .count_vae import TARGET_SUM, CountVAE, CountVAEConfig

__all__ = [
    "ALIGNMENTS",
    "MODALITIES",
    "MODEL_CLASS",
    "MultiomicsConfig",
    "MultiomicsOutput",
    "MultiomicsVAE",
]

MODEL_CLASS = "latentcell.models.multiomics.MultiomicsVAE"
MODALITIES = ("rna", "protein")
ALIGNMENTS = ("symmetric_kl", "mean_distance")
RNA_LIKELIHOODS = ("nb", "zinb")


@dataclass(frozen=True)
class MultiomicsConfig:
    """Sizes and objective of a ``MultiomicsVAE``; frozen so it can be saved and rebuilt.

    n_genes / n_proteins: the modelled RNA genes and proteins. n_latent, n_hidden, n_layers,
    dropout: both count VAEs (dropout in the encoders only, as in ``CountVAE``).
    rna_likelihood: nb | zinb (proteins are NB). alignment / alignment_weight: the term tying
    the two posteriors (module docstring). kl_warmup_steps: the KL weight rises linearly to 1.
    """

    n_genes: int
    n_proteins: int
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    rna_likelihood: str = "nb"
    dropout: float = 0.1
    alignment: str = "symmetric_kl"
    alignment_weight: float = 1.0
    cross_reconstruction: bool = True
    kl_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if min(self.n_genes, self.n_proteins) < 1:
            raise ValueError("n_genes and n_proteins must be >= 1")
        if self.rna_likelihood not in RNA_LIKELIHOODS:
            raise ValueError(
                f"rna_likelihood must be one of {RNA_LIKELIHOODS}, got {self.rna_likelihood!r}"
            )
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.alignment_weight < 0 or self.kl_warmup_steps < 0:
            raise ValueError("alignment_weight and kl_warmup_steps must be >= 0")
        self.modality_config("rna")  # sizes and dropout fail here, naming themselves

    def modality_config(self, modality: str) -> CountVAEConfig:
        """The ``CountVAEConfig`` of one modality's half."""
        return CountVAEConfig(
            n_genes=self.n_genes if modality == "rna" else self.n_proteins,
            n_latent=self.n_latent,
            n_hidden=self.n_hidden,
            n_layers=self.n_layers,
            likelihood=self.rna_likelihood if modality == "rna" else "nb",
            dropout=self.dropout,
        )


@dataclass
class MultiomicsOutput:
    """What ``MultiomicsVAE.forward`` returns to the loop: ``loss`` (mean over real cells of
    the reconstructions, ``kl_weight`` times both KLs and ``alignment_weight`` times the
    alignment), ``n_cells``, and the detached per-cell means of every term."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    kl_weight: float
    n_cells: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]:
        return {"loss": self.loss.detach(), **self.terms, "kl_weight": self.kl_weight}


def _gaussian_kl(mean_a, log_var_a, mean_b, log_var_b) -> torch.Tensor:
    """KL(N(a) || N(b)) per cell, summed over latent dimensions (diagonal Gaussians)."""
    diff = log_var_a - log_var_b
    distance = (mean_a - mean_b) ** 2 / torch.exp(log_var_b)
    return 0.5 * (torch.exp(diff) + distance - 1.0 - diff).sum(-1)


def _prior_kl(mean, log_var) -> torch.Tensor:
    return 0.5 * (torch.exp(log_var) + mean**2 - 1.0 - log_var).sum(-1)


class MultiomicsVAE(nn.Module):
    """Two ``CountVAE`` halves (``rna``, ``protein``) over one latent space."""

    def __init__(self, config: MultiomicsConfig) -> None:
        super().__init__()
        self.config = config
        self.rna = CountVAE(config.modality_config("rna"))
        self.protein = CountVAE(config.modality_config("protein"))

    def part(self, modality: str) -> CountVAE:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return self.rna if modality == "rna" else self.protein

    def kl_weight(self, step: int | torch.Tensor = 0) -> float:
        """Linear KL warm-up: ``min(1, step / kl_warmup_steps)`` (1 without warm-up)."""
        if self.config.kl_warmup_steps <= 0:
            return 1.0
        return float(min(1.0, max(0.0, float(step) / self.config.kl_warmup_steps)))

    # -- training -------------------------------------------------------------------------

    def _terms(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Per-cell terms of the objective, one reparameterized draw per posterior."""
        counts = {m: batch[m].float() for m in MODALITIES}
        library = {m: counts[m].sum(-1) for m in MODALITIES}
        posterior, draw = {}, {}
        for m in MODALITIES:
            mean, log_var = self.part(m).encode(counts[m], library[m])
            posterior[m] = (mean, log_var)
            draw[m] = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)

        def nll(target: str, source: str) -> torch.Tensor:
            part = self.part(target)
            params = part.decode(draw[source], library[target])
            return -part.log_likelihood(counts[target], library[target], params)

        terms = {
            "rna_reconstruction": nll("rna", "rna"),
            "protein_reconstruction": nll("protein", "protein"),
            "kl_rna": _prior_kl(*posterior["rna"]),
            "kl_protein": _prior_kl(*posterior["protein"]),
        }
        if self.config.cross_reconstruction:
            terms["rna_from_protein"] = nll("rna", "protein")
            terms["protein_from_rna"] = nll("protein", "rna")
        (mr, vr), (mp, vp) = posterior["rna"], posterior["protein"]
        if self.config.alignment == "symmetric_kl":
            terms["alignment"] = 0.5 * (_gaussian_kl(mr, vr, mp, vp) + _gaussian_kl(mp, vp, mr, vr))
        else:
            terms["alignment"] = ((mr - mp) ** 2).sum(-1)
        return terms

    def forward(self, batch: Mapping, step: int | torch.Tensor = 0) -> MultiomicsOutput:
        """The loss of a loader batch (``rna`` and ``protein`` counts of the same cells,
        ``is_pad`` marking pad rows), averaged over its real cells."""
        terms = self._terms(batch)
        first = terms["rna_reconstruction"]
        is_pad = batch.get("is_pad")
        keep = torch.ones_like(first, dtype=torch.bool) if is_pad is None else ~is_pad.bool()
        n_cells = keep.sum()
        denom = n_cells.clamp_min(1).to(first.dtype)
        means = {
            k: torch.where(keep, v, torch.zeros_like(v)).sum() / denom for k, v in terms.items()
        }
        weight = self.kl_weight(step)
        loss = means["alignment"] * self.config.alignment_weight
        for key, value in means.items():
            if key.startswith("kl_"):
                loss = loss + weight * value
            elif key != "alignment":
                loss = loss + value
        detached = {k: v.detach() for k, v in means.items()}
        return MultiomicsOutput(loss, detached, weight, n_cells)

    # -- translation ----------------------------------------------------------------------

    def encode(self, modality: str, counts: torch.Tensor) -> torch.Tensor:
        """The posterior mean of cells measured in ``modality`` (counts, library = row sums)."""
        return self.part(modality).encode(counts.float(), counts.float().sum(-1))[0]

    def decode_scale(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        """The decoded proportions of ``modality`` (rows sum to 1) at latent ``z``."""
        return self.part(modality).decode(z, 1.0)["scale"]

    def translate(self, counts: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Proportions of ``target`` for cells measured in ``source`` (posterior mean)."""
        return self.decode_scale(target, self.encode(source, counts))


class TranslationServing(nn.Module):
    """The MLflow serving form: RNA counts (n, n_genes) -> the predicted protein expression,
    log1p(proportion * 1e4) (n, n_proteins), the normalization the benchmark scores."""

    def __init__(self, model: MultiomicsVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.model.translate(counts, "rna", "protein") * TARGET_SUM)
