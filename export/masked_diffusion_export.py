"""ONNX export of a masked-diffusion run (conditional discrete diffusion over binned
expression): the control-set encoder and the denoiser, plus the "masked_diffusion" metadata
section the torch-free runtime predicts from (``OnnxMaskedDiffusionPredictor``).

The graphs hold the networks only; the unmasking loop, the guidance, the Gumbel draws and
the decoding of bins into values are ``inference/masked_diffusion_sampling.py``'s numpy, run
by the torch predictor and the runtime alike, so the section is
``masked_diffusion_settings(card)`` and nothing more (the bin edges are in it). Two graphs,
not one: the control set is encoded once per set and its memory reused by every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import Dim

from latentcell.inference.masked_diffusion_sampling import masked_diffusion_settings
from latentcell.models.masked_diffusion import MaskedDiffusion

from .exporters import ExportPlan, run_genes
from .graphs import ExportGraph, N, S

__all__ = ["ControlEncoderGraph", "MaskedDenoiserGraph", "plan_masked_diffusion"]

KIND = "masked-diffusion"
C = Dim("c")  # control cells per set: the memory's rows, free of the generated set's size


class ControlEncoderGraph(ExportGraph):
    """control (n, s, G) float32 log1p expression -> memory (n, s, hidden): one vector per
    control cell, after self-attention across its set."""

    input_names = ("control",)
    output_names = ("memory",)

    def __init__(self, model: MaskedDiffusion) -> None:
        super().__init__()
        self.model = model

    def example(self):
        return (torch.zeros(2, 3, self.model.config.n_genes),)

    def dims(self):
        return {"control": {0: N, 1: S}}

    def forward(self, control):
        return self.model.encode_controls(control)


class MaskedDenoiserGraph(ExportGraph):
    """tokens (n, s, G) int64 bins (``n_bins`` = MASK), control_bins (n, s, G) int64 (cell
    i's paired control's bins), memory (n, c, hidden) float32 (the control encoder's),
    perturbation (n,) int64 (``null_code`` = none) -> logits (n, s, G, n_bins) float32. The memory's set size is its own dimension: a set's controls and its
    generated cells need not be as many."""

    input_names = ("tokens", "control_bins", "memory", "perturbation")
    output_names = ("logits",)
    # 2 sets of 2 cells, then 1 set of 19 (``onnx_io.parity`` picks the set sizes): a cell
    # is G tokens, so the default 64 sets of 36 cells would attend over 2,304 sequences of
    # G tokens at once (147 GB of ONNX attention scores at G = 2,000, 4 heads); these stay
    # below one sampler call (up to 8 sets of the run's set size).
    parity_sizes = (2, 1)

    def __init__(self, model: MaskedDiffusion) -> None:
        super().__init__()
        self.model = model

    def example(self):
        c = self.model.config
        # s=3 and c=4 differ, so torch.export does not tie the two set dimensions together
        tokens = torch.full((2, 3, c.n_genes), c.n_bins, dtype=torch.long)
        control_bins = torch.zeros(2, 3, c.n_genes, dtype=torch.long)
        return (tokens, control_bins, torch.zeros(2, 4, c.hidden), torch.zeros(2, dtype=torch.long))

    def dims(self):
        return {"tokens": {0: N, 1: S}, "control_bins": {0: N, 1: S}, "memory": {0: N, 1: C},
                "perturbation": {0: N}}  # fmt: skip

    def forward(self, tokens, control_bins, memory, perturbation):
        return self.model.logits(tokens, control_bins, memory, perturbation)


def plan_masked_diffusion(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    """The masked-diffusion family's exporter (``families.registry``): the two graphs, the
    genes and the "masked_diffusion" section (``masked_diffusion_settings``)."""
    from latentcell.inference.masked_diffusion_predictor import load_masked_diffusion

    model, card, path = load_masked_diffusion(run_dir, weights)
    components = {
        "control_encoder": ControlEncoderGraph(model),
        "denoiser": MaskedDenoiserGraph(model),
    }
    sections = {"genes": run_genes(card), "masked_diffusion": masked_diffusion_settings(card)}
    return ExportPlan(KIND, components, sections, path)
