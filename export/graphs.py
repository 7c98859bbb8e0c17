"""The exported graphs: each trained component behind plain named tensor inputs.

One ``nn.Module`` per ONNX file, wrapping the trained model without copying its weights, so
the graph is the model's own forward pass. Every graph also says its input names, example
inputs and which dimensions are dynamic (batch ``n``; set models also the set size ``s``);
examples use sizes of at least 2 because ``torch.export`` specializes dimensions of size 0
or 1. Inputs that a model does not use (no batch one-hot, no continuous condition) are left
out rather than passed as zero-width tensors, which onnxruntime handles poorly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from latentcell.models.count_vae import CountVAE
from latentcell.models.dit import DiT
from latentcell.models.st_model import STModel

__all__ = [
    "ConditionerGraph",
    "DenoiserBodyGraph",
    "DenoiserGraph",
    "ExportGraph",
    "SharedDenoiserBodyGraph",
    "SetModelGraph",
    "VAEDecoderGraph",
    "VAEEncoderGraph",
]

N = Dim("n")  # cells (rows) of a call
S = Dim("s")  # cells per set
U = Dim("u")  # distinct conditions of a denoiser call


class ExportGraph(nn.Module):
    """``input_names`` / ``output_names`` in call order; ``example()`` inputs; ``dims()``
    the dynamic dimensions per input (``torch.export`` dynamic_shapes); ``parity_sizes``
    the rows of the export's parity calls (``onnx_io.parity``)."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    parity_sizes: tuple[int, ...] = (1, 3, 64)

    def example(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def named(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Inputs by name: graphs are called (and exported) with keyword arguments, since
        optional inputs may be absent in any combination."""
        return dict(zip(self.input_names, inputs, strict=True))

    def dims(self) -> dict[str, dict[int, Dim]]:
        return {name: {0: N} for name in self.input_names}

    def describe(self) -> dict:
        """Names, dtypes and shapes of the inputs and outputs, for the bundle's metadata."""
        example = self.example()
        dims = self.dims()
        inputs = {
            name: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": [
                    dims[name][i].__name__ if i in dims[name] else s for i, s in enumerate(t.shape)
                ],  # fmt: skip
            }
            for name, t in zip(self.input_names, example, strict=True)
        }
        return {"inputs": inputs, "outputs": list(self.output_names)}


def _vae_batch(vae: CountVAE, n: int) -> list[torch.Tensor]:
    return [torch.zeros(n, dtype=torch.long)] if vae.config.n_batches else []


class VAEEncoderGraph(ExportGraph):
    """counts (n, G) float32, library_size (n,) [, batch (n,) int64] -> posterior mean and
    log variance (n, d). The library size is an input (the observed row sums for raw
    counts) rather than recomputed, so callers that hold normalized data pass 1e4."""

    output_names = ("mean", "log_var")

    def __init__(self, vae: CountVAE) -> None:
        super().__init__()
        self.vae = vae
        self.uses_batch = vae.config.encode_covariates and vae.config.n_batches > 0
        self.input_names = ("counts", "library_size") + (("batch",) if self.uses_batch else ())

    def example(self):
        counts = torch.ones(2, self.vae.config.n_genes)
        extra = _vae_batch(self.vae, 2) if self.uses_batch else []
        return (counts, counts.sum(-1), *extra)

    def forward(self, counts, library_size, batch=None):
        return self.vae.encode(counts, library_size, batch)


class VAEDecoderGraph(ExportGraph):
    """latent (n, d), library_size (n,) [, batch (n,) int64] -> the likelihood's parameters:
    NB ``mu, theta``; ZINB also ``zi_logits``; Gaussian ``mean, log_var`` of the
    log1p-normalized expression (all (n, G))."""

    PARAMETERS = {"nb": ("mu", "theta"), "zinb": ("mu", "theta", "zi_logits"),
                  "gaussian": ("mean", "log_var")}  # fmt: skip

    def __init__(self, vae: CountVAE) -> None:
        super().__init__()
        self.vae = vae
        self.output_names = self.PARAMETERS[vae.config.likelihood]
        self.input_names = ("latent", "library_size") + (("batch",) if vae.config.n_batches else ())

    def example(self):
        return (torch.zeros(2, self.vae.config.n_latent), torch.full((2,), 1e4),
                *_vae_batch(self.vae, 2))  # fmt: skip

    def forward(self, latent, library_size, batch=None):
        params = self.vae.decode(latent, library_size, batch)
        return tuple(params[name] for name in self.output_names)


def _exportable(dit: DiT) -> DiT:
    """``dit`` with the transpose-free attention its graphs are exported with."""
    for block in dit.blocks:
        block.attn.explicit = True
    return dit


class DenoiserGraph(ExportGraph):
    """x (n, d) scaled latent, t (n,) time in [0, 1] [, codes (n, k) int64 with
    ``n_categories[k]`` as the null] [, values (n, m) standardized, NaN as the null] -> the
    DiT's prediction (n, d): epsilon, v or velocity, as the run's objective defines it.
    Exported with the transpose-free attention (``dit.Attention.explicit``)."""

    output_names = ("prediction",)

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = _exportable(dit)
        c = dit.config
        self.n_codes, self.n_values = len(c.n_categories), c.n_continuous
        self.input_names = (
            ("x", "t")
            + (("codes",) if self.n_codes else ())
            + (("values",) if self.n_values else ())
        )

    def example(self):
        codes, values = self.dit.null_condition(2, "cpu")
        extra = ([codes] if self.n_codes else []) + (
            [values.nan_to_num(0.0)] if self.n_values else []
        )
        return (torch.zeros(2, self.dit.config.n_latent), torch.full((2,), 0.5), *extra)

    def forward(self, x, t, codes=None, values=None):
        return self.dit(x, t, *self.condition(t, codes, values))

    def condition(self, t, codes, values) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs a model without that covariate leaves out, as the null condition."""
        null_codes, null_values = self.dit.null_condition(t.shape[0], t.device)
        return (null_codes if codes is None else codes,
                null_values if values is None else values)  # fmt: skip


class ConditionerGraph(DenoiserGraph):
    """t (n,) [, codes (n, k)] [, values (n, m)] -> modulation (n, W): every DiT block's adaLN
    parameters (``DiT.modulations``), the part of the denoiser that sees only the time and
    the condition. The runtime runs it on the distinct (t, condition) rows of a step."""

    output_names = ("modulation",)

    def __init__(self, dit: DiT) -> None:
        super().__init__(dit)
        self.input_names = self.input_names[1:]  # no x

    def example(self):
        return super().example()[1:]

    def forward(self, t, codes=None, values=None):
        return self.dit.modulations(t, *self.condition(t, codes, values))


class DenoiserBodyGraph(ExportGraph):
    """x (n, d), modulation (u, W) for u distinct conditions, group (n,) int64 (each row's
    modulation row) -> the DiT's prediction (n, d); with ``ConditionerGraph`` it computes
    exactly what ``DenoiserGraph`` does, without repeating the conditioning per row."""

    input_names = ("x", "modulation", "group")
    output_names = ("prediction",)

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = _exportable(dit)

    def example(self):
        d = self.dit.config.n_latent
        return (torch.zeros(2, d), torch.zeros(3, self.dit.modulation_width),
                torch.tensor([0, 2], dtype=torch.long))  # fmt: skip

    def dims(self) -> dict[str, dict[int, Dim]]:
        return {"x": {0: N}, "modulation": {0: U}, "group": {0: N}}

    def forward(self, x, modulation, group):
        return self.dit.forward_modulated(x, modulation[group])


class SharedDenoiserBodyGraph(DenoiserBodyGraph):
    """x (n, d), modulation (1, W) -> prediction (n, d), every row under one condition: the
    parameters broadcast, nothing is gathered per row (the common request: one condition,
    and each half of a guided step)."""

    input_names = ("x", "modulation")

    def example(self):
        d = self.dit.config.n_latent
        return torch.zeros(2, d), torch.zeros(1, self.dit.modulation_width)

    def dims(self) -> dict[str, dict[int, Dim]]:
        return {"x": {0: N}, "modulation": {}}

    def forward(self, x, modulation):
        return self.dit.forward_modulated(x, modulation)


class SetModelGraph(ExportGraph):
    """control (b, s, F) features, perturbation (b,) int64, mask (b, s) bool (True = real
    cell) [, cell_type (b,) int64] [, batch (b, s) int64] [, generic (b,) bool] [, targets
    (b, F) float] [, unknown (b,) bool] -> predicted features (b, s, F): ``STModel.predict``
    with every optional input the model was trained to use (``cell_type`` also for the
    per-type mean of ``basal="train"``; ``unknown``: the unknown cell type)."""

    output_names = ("prediction",)

    def __init__(self, model: STModel) -> None:
        super().__init__()
        self.model = model
        c = model.config
        self.optional = tuple(
            name
            for name, used in (
                ("cell_type", model.uses_cell_type),
                ("batch", c.n_batches > 0),
                ("generic", c.perturbation_dropout > 0),
                ("targets", c.target_effect),
                ("unknown", model.takes_unknown),
            )
            if used
        )
        self.input_names = ("control", "perturbation", "mask", *self.optional)

    def example(self):
        b, s, f = 2, 3, self.model.config.n_features
        shapes = {
            "cell_type": torch.zeros(b, dtype=torch.long),
            "batch": torch.zeros(b, s, dtype=torch.long),
            "generic": torch.zeros(b, dtype=torch.bool),
            "targets": torch.zeros(b, f),
            "unknown": torch.zeros(b, dtype=torch.bool),
        }
        control = torch.rand(b, s, f)
        mask = torch.ones(b, s, dtype=torch.bool)
        return (control, torch.zeros(b, dtype=torch.long), mask,
                *(shapes[n] for n in self.optional))  # fmt: skip

    def dims(self):
        per_set = {"control": {0: N, 1: S}, "mask": {0: N, 1: S}, "batch": {0: N, 1: S}}
        return {name: per_set.get(name, {0: N}) for name in self.input_names}

    def forward(
        self, control, perturbation, mask, cell_type=None, batch=None, generic=None, targets=None,
        unknown=None,
    ):  # fmt: skip
        return self.model.predict(
            control, perturbation, mask, cell_type, batch, generic, targets, unknown
        )
