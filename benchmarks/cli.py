"""``latentcell benchmark <name>``: one subcommand per benchmark module (imported when run)."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help); each module has add_arguments(parser) and run(args)
BENCHMARKS = {
    "heldout-celltype": (
        "latentcell.benchmarks.heldout_celltype",
        "hold out each cell type's perturbed cells; ST vs every baseline and the ceiling",
    ),
    "generation": (
        "latentcell.benchmarks.generation",
        "hold out cells of every condition group; VAE + DiT vs the Gaussian in PCA, the VAE "
        "prior and the real-vs-real ceiling, over training and sampling seeds",
    ),
}


def add_benchmark_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("benchmark", help="run a benchmark and write its results into --out")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, (module, help_text) in BENCHMARKS.items():
        parser = bench_sub.add_parser(name, help=help_text, description=help_text)
        loaded = importlib.import_module(module)
        loaded.add_arguments(parser)
        parser.set_defaults(func=loaded.run)
