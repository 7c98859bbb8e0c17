"""One graph -> one checked ONNX file, and its parity with torch measured on the spot.

``torch.onnx.export`` with the dynamo exporter (the legacy exporter breaks dynamic set sizes;
this one needs onnxscript), opset 20 by default and never below 18 (17 produces Split nodes
onnxruntime refuses; see ``../shared/notes/stack-on-cpu.md``). Why 20: it has a native
tanh-approximated ``Gelu``, which onnxruntime runs as one fused kernel; at 18 the DiT's GELU
is exported as Pow/Tanh/Mul/Add and the 50-step sampler at batch 256 ran 1.5x slower. The file passes ``onnx.checker`` (full check, with
shape inference), carries the bundle's metadata in ``metadata_props``, and is written to a
temporary name and renamed, so a failed export never leaves a half file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .graphs import ExportGraph, N

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "Parity", "export_graph", "parity"]

MIN_OPSET = 18
DEFAULT_OPSET = 20
TOLERANCE = 1e-4  # max |ORT - torch| / (1 + |torch|) accepted at export time


@dataclass(frozen=True)
class Parity:
    """max_abs_error: the largest |ORT - torch| over every output at ``sizes`` inputs;
    max_rel_error: the same divided by (1 + |torch|)."""

    max_abs_error: float
    max_rel_error: float
    sizes: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "sizes": list(self.sizes), "tolerance": TOLERANCE}  # fmt: skip


def export_graph(graph: ExportGraph, path: Path, props: dict[str, str], opset: int) -> None:
    """Export ``graph`` to ``path`` (atomically) with ``props`` as metadata_props."""
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (17 breaks onnxruntime), got {opset}")
    graph.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (), kwargs=graph.named(graph.example()), dynamic_shapes=graph.dims(),
            opset_version=opset,
            input_names=list(graph.input_names), output_names=list(graph.output_names),
            dynamo=True, verbose=False,
        )  # fmt: skip
    model = program.model_proto
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(model, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _resized(graph: ExportGraph, n: int, s: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The example inputs at n rows (and s cells per set), filled with plausible values."""
    g = torch.Generator().manual_seed(seed)
    dims = graph.dims()
    out = []
    for name, t in zip(graph.input_names, graph.example(), strict=True):
        shape = [n if dims[name].get(i) is N else (s if dims[name].get(i) is not None else d)
                 for i, d in enumerate(t.shape)]  # fmt: skip
        if t.dtype == torch.bool:
            x = (
                torch.ones(shape, dtype=torch.bool)
                if name == "mask"
                else torch.rand(shape, generator=g) < 0.5
            )
        elif t.dtype == torch.long:
            x = torch.zeros(shape, dtype=torch.long)  # code 0 exists in every vocabulary
        elif name in ("counts", "control"):
            x = torch.poisson(torch.rand(shape, generator=g) * 3, generator=g)
            x = x if name == "counts" else torch.log1p(x)
        elif name == "library_size":
            x = torch.full(shape, 1e4)
        elif name == "targets":
            x = (torch.rand(shape, generator=g) < 0.01).float()
        elif name == "t":
            x = torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x)
    if "counts" in graph.input_names and "library_size" in graph.input_names:
        out[graph.input_names.index("library_size")] = out[0].sum(-1).clamp_min(1.0)
    return tuple(out)


def parity(graph: ExportGraph, path: Path, sizes: tuple[int, ...] = (1, 3, 64)) -> Parity:
    """ORT against torch eager on the same random inputs at each size (set models: that many
    sets of 2 .. 40 cells), the ORT session on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    abs_err = rel_err = 0.0
    for i, n in enumerate(sizes):
        inputs = _resized(graph, n, s=2 + (17 * i) % 39, seed=i)
        with torch.no_grad():
            expected = graph(**graph.named(inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {name: t.numpy() for name, t in zip(graph.input_names, inputs, strict=True)}
        got = session.run(list(graph.output_names), feeds)
        for e, o in zip(expected, got, strict=True):
            e = e.float().numpy()
            diff = np.abs(e - o)
            abs_err = max(abs_err, float(diff.max(initial=0.0)))
            rel_err = max(rel_err, float((diff / (1.0 + np.abs(e))).max(initial=0.0)))
    return Parity(abs_err, rel_err, tuple(sizes))
