"""``latentcell benchmark <name>``: one subcommand per benchmark module (imported when chosen)."""

from __future__ import annotations

import argparse
import sys

from latentcell.data_pipelines.lazy_commands import lazy_command

# name -> (module, one-line help); each module has add_arguments(parser) and run(args)
BENCHMARKS = {
    "heldout-celltype": (
        "latentcell.benchmarks.heldout_celltype",
        "hold out each cell type's perturbed cells; ST vs every baseline and the ceiling",
    ),
    "perturbation": (
        "latentcell.benchmarks.perturbation",
        "the perturbation leaderboard: every family and baseline under one split and one "
        "evaluator, mean ± sd over seeds, beside the cell-mean baseline and the ceiling",
    ),
    "uncertainty": (
        "latentcell.benchmarks.uncertainty",
        "calibrated uncertainty: variance R² and coverage of the real mean by the spread of "
        "repeated predictions, per family and baseline, beside a calibrated real reference",
    ),
    "latent-shift-pairing": (
        "latentcell.benchmarks.latent_shift_pairing",
        "random vs optimal-transport pairing of control and perturbed cells for latent shift",
    ),
    "generation": (
        "latentcell.benchmarks.generation",
        "hold out cells of every condition group; VAE + DiT vs the Gaussian in PCA, the VAE "
        "prior and the real-vs-real ceiling, over training and sampling seeds",
    ),
    "papalexi2021": (
        "latentcell.benchmarks.papalexi2021",
        "ST vs every baseline on Papalexi 2021 (held-out cells and held-out targets), cell-eval",
    ),
    "vae-scvi": (
        "latentcell.benchmarks.vae_vs_scvi",
        "the count VAE against scvi-tools' SCVI on the same cells, side by side",
    ),
    "dit-throughput": (
        "latentcell.benchmarks.dit_throughput",
        "DiT training steps/s and whole-generation cells/s on this machine",
    ),
    "st-throughput": (
        "latentcell.benchmarks.st_throughput",
        "ST training throughput, beside Arc's STATE when it is installed",
    ),
    "masked-diffusion-throughput": (
        "latentcell.benchmarks.masked_diffusion_throughput",
        "masked-diffusion training cells/s per tokenization beside ST, and sampling cells/s "
        "against the number of steps",
    ),
    "readers": (
        "latentcell.benchmarks.readers",
        "read throughput of the Zarr and WebDataset stores against h5ad readers",
    ),
    "loader": (
        "latentcell.benchmarks.loader",
        "the Zarr and WebDataset streams and the set sampler beside scDataset, anndata backed "
        "and the in-RAM gather ceiling, alternating in one run, with the targets",
    ),
    "integrity": (
        "latentcell.benchmarks.integrity_cost",
        "what the read-time integrity checks cost the cell stream (paired ratios)",
    ),
    "codecs": (
        "latentcell.benchmarks.codecs",
        "store size and read speed per layout and codec (how the default was chosen)",
    ),
    "scale": (
        "latentcell.benchmarks.scale",
        "synthesize, build and stream 1M or 10M cells: build time, store size, peak RSS of "
        "each phase, cells/s (side by side to show memory stays flat)",
    ),
    "remote-latency": (
        "latentcell.benchmarks.remote_latency",
        "cell stream cells/s from a store served over HTTP with 0/20/100 ms per request, and "
        "the units in flight (fetch_units) that hide the latency",
    ),
    "gpu-check": (
        "latentcell.benchmarks.gpu_check",
        "VAE, DiT and ST training cells/s and model FLOPs utilization on this machine's GPU "
        "(the CPU fallback without one)",
    ),
    "multiomics": (
        "latentcell.benchmarks.multiomics",
        "RNA <-> protein translation on held-out cells (k-fold over cells): the multiomics "
        "family beside ridge regression (and totalVI when scvi-tools is installed)",
    ),
    "trajectory": (
        "latentcell.benchmarks.trajectory",
        "the DiT conditioned on continuous time at held-out time bins (interior and last) "
        "beside interpolation / persistence of the neighbouring bins and the ceiling",
    ),
    "spatial": (
        "latentcell.benchmarks.spatial",
        "spatial generation and super-resolution at held-out spots: a DiT conditioned on "
        "spot coordinates beside the k-nearest-spot average (k-fold over spots)",
    ),
    "onnx-runtime": (
        "latentcell.benchmarks.onnx_runtime",
        "torch eager against the onnxruntime runtime on the same trained runs",
    ),
}


def add_benchmark_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("benchmark", help="run a benchmark and write its results into --out")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, (module, help_text) in BENCHMARKS.items():  # imported only when chosen
        lazy_command(bench_sub, name, help_text, f"{module}:add_arguments", f"{module}:run")


def standalone(doc: str, add_arguments, run) -> int:
    """``python -m latentcell.benchmarks.MODULE [args]``: the same parser and run as ``latentcell
    benchmark NAME``, with the CLI's error rule (one line, exit 2; ``--debug`` for the trace)."""
    from latentcell.data_pipelines.errors import debug_requested, run_cli

    debug, argv = debug_requested(sys.argv[1:])
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), debug)
