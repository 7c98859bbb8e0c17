"""ONNX export of a multiomics run: both encoders and both decoders, and the "multiomics"
metadata section that says how to chain them into a translation.

Translation without torch is two calls: ``rna_encoder`` (RNA counts -> posterior mean and
log variance) then ``protein_decoder`` (latent -> NB ``mu, theta`` of the proteins at the
library given), or ``protein_encoder`` then ``rna_decoder``. Each graph is one half of the
model's own forward pass (``CountVAE.encode`` / ``decode``), so their parity with torch is
the model's. The genes and proteins are recorded in model order; the section also holds the
training cells' median libraries, at which ``latentcell predict --to`` writes its counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentcell.inference.gene_names import GeneNames
from latentcell.models.count_vae import CountVAE

from .exporters import ExportPlan
from .graphs import ExportGraph

__all__ = ["ModalityDecoderGraph", "ModalityEncoderGraph", "plan_multiomics"]

KIND = "multiomics"


class ModalityEncoderGraph(ExportGraph):
    """counts (n, F) float32, library_size (n,) -> q(z | counts): mean, log_var (n, d). F is
    the modality's features (the run's genes or proteins); the library is the row sums."""

    input_names = ("counts", "library_size")
    output_names = ("mean", "log_var")

    def __init__(self, vae: CountVAE) -> None:
        super().__init__()
        self.vae = vae

    def example(self):
        counts = torch.ones(2, self.vae.config.n_genes)
        return counts, counts.sum(-1)

    def forward(self, counts, library_size):
        return self.vae.encode(counts, library_size)


class ModalityDecoderGraph(ExportGraph):
    """latent (n, d), library_size (n,) -> the modality's NB ``mu, theta`` (n, F); a ZINB RNA
    decoder also ``zi_logits``. ``mu / library_size`` are the decoded proportions."""

    input_names = ("latent", "library_size")

    def __init__(self, vae: CountVAE) -> None:
        super().__init__()
        self.vae = vae
        zinb = vae.config.likelihood == "zinb"
        self.output_names = ("mu", "theta", "zi_logits") if zinb else ("mu", "theta")

    def example(self):
        return torch.zeros(2, self.vae.config.n_latent), torch.full((2,), 1e4)

    def forward(self, latent, library_size):
        params = self.vae.decode(latent, library_size)
        return tuple(params[name] for name in self.output_names)


def plan_multiomics(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    """The multiomics family's exporter (``families.registry``)."""
    from latentcell.inference.multiomics_translator import load_translator
    from latentcell.inference.trained_runs import weights_path

    translator = load_translator(run_dir, weights)
    model = translator.model
    components = {
        "rna_encoder": ModalityEncoderGraph(model.rna),
        "protein_encoder": ModalityEncoderGraph(model.protein),
        "rna_decoder": ModalityDecoderGraph(model.rna),
        "protein_decoder": ModalityDecoderGraph(model.protein),
    }
    section = {
        "proteins": list(translator.proteins),
        "protein_key": translator.protein_key,
        "n_latent": model.config.n_latent,
        "rna_likelihood": model.config.rna_likelihood,
        "rna_library": translator.library["rna"],
        "protein_library": translator.library["protein"],
        "translate": {"protein": ["rna_encoder", "protein_decoder"],
                      "rna": ["protein_encoder", "rna_decoder"]},
    }  # fmt: skip
    genes = GeneNames.from_card(translator.genes).to_dict()
    sections = {"genes": genes, KIND: section}
    return ExportPlan(KIND, components, sections, weights_path(run_dir, weights))
