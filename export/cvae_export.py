"""ONNX export of a conditional-VAE run (seed 003): its conditional encoder and decoder, and
the "cvae" metadata section the torch-free runtime predicts from (``OnnxCVAEPredictor``).

The graphs take the conditions as int64 codes, one (n,) input per role the run conditions
on (``perturbation``, then ``cell_type`` and ``batch`` when used), and one-hot them inside:
the same encoding as the torch model, and an out-of-vocabulary code cannot silently become
a wrong-width vector. They are saved as the bundle's ``vae_encoder`` and ``vae_decoder``
(the runtime's component names; their inputs, recorded in the metadata, say they are
conditional), in a bundle of kind "cvae".
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentcell.inference.cvae_modes import cvae_settings
from latentcell.models.cvae import ConditionalVAE

from .exporters import ExportPlan, run_genes
from .graphs import ExportGraph

__all__ = ["CVAEDecoderGraph", "CVAEEncoderGraph", "plan_cvae"]

KIND = "cvae"


class _Conditional(ExportGraph):
    def __init__(self, model: ConditionalVAE, first: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.roles = model, model.roles
        self.input_names = (*first, *self.roles)

    def codes(self, n: int) -> list[torch.Tensor]:
        return [torch.zeros(n, dtype=torch.long) for _ in self.roles]

    def conditions(self, perturbation, cell_type, batch) -> dict[str, torch.Tensor]:
        given = {"perturbation": perturbation, "cell_type": cell_type, "batch": batch}
        return {role: given[role] for role in self.roles}


class CVAEEncoderGraph(_Conditional):
    """counts (n, G) float32, library_size (n,), perturbation (n,) int64 [, cell_type (n,)]
    [, batch (n,)] -> q(z | x, c): mean and log variance (n, d). Log1p-normalized input goes
    in as ``expm1(x)`` with library 1e4 (the exact inverse of the normalization)."""

    output_names = ("mean", "log_var")

    def __init__(self, model: ConditionalVAE) -> None:
        super().__init__(model, ("counts", "library_size"))

    def example(self):
        counts = torch.ones(2, self.model.config.n_genes)
        return (counts, counts.sum(-1), *self.codes(2))

    def forward(self, counts, library_size, perturbation, cell_type=None, batch=None):
        codes = self.conditions(perturbation, cell_type, batch)
        return self.model.encode_under(counts, library_size, codes)


class CVAEDecoderGraph(_Conditional):
    """latent (n, d), library_size (n,), perturbation (n,) int64 [, cell_type] [, batch] ->
    p(x | z, c)'s parameters: NB ``mu, theta``; ZINB also ``zi_logits``; Gaussian ``mean,
    log_var`` of the log1p-normalized expression (all (n, G))."""

    PARAMETERS = {"nb": ("mu", "theta"), "zinb": ("mu", "theta", "zi_logits"),
                  "gaussian": ("mean", "log_var")}  # fmt: skip

    def __init__(self, model: ConditionalVAE) -> None:
        super().__init__(model, ("latent", "library_size"))
        self.output_names = self.PARAMETERS[model.config.likelihood]

    def example(self):
        return (torch.zeros(2, self.model.config.n_latent), torch.full((2,), 1e4),
                *self.codes(2))  # fmt: skip

    def forward(self, latent, library_size, perturbation, cell_type=None, batch=None):
        codes = self.conditions(perturbation, cell_type, batch)
        params = self.model.decode_under(latent, codes, library_size)
        return tuple(params[name] for name in self.output_names)


def plan_cvae(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    """The cvae family's exporter (``families.registry``): both graphs, the genes (ids and
    symbols from the training store when it is still there, else the card's keys) and the
    "cvae" section (``cvae_settings``: labels, control label, columns, likelihood, ...)."""
    from latentcell.inference.cvae_predictor import load_cvae

    model, card, path = load_cvae(run_dir, weights)
    genes = run_genes(card)
    components = {"vae_encoder": CVAEEncoderGraph(model), "vae_decoder": CVAEDecoderGraph(model)}
    return ExportPlan(KIND, components, {"genes": genes, "cvae": cvae_settings(card)}, path)
