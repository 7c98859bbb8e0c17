"""``latentcell data synth|build|inspect|verify|split``: thin wrappers over the library functions."""

from __future__ import annotations

import argparse


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    from latentcell.data_pipelines.build import add_build_arguments, run_build
    from latentcell.data_pipelines.inspect_store import (
        add_inspect_arguments,
        add_verify_arguments,
        run_inspect,
        run_verify,
    )
    from latentcell.data_pipelines.split_files import add_split_arguments, run_split
    from latentcell.data_pipelines.synth import add_synth_arguments, run_synth

    data = sub.add_parser("data", help="synthesize, build, inspect, verify and split cell stores")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, help_text, add_args, run in (
        (
            "synth",
            "write a synthetic VCC- or scBaseCount-schema h5ad",
            add_synth_arguments,
            run_synth,
        ),
        (
            "build",
            "validate h5ad inputs and write a Zarr v3 or WebDataset store",
            add_build_arguments,
            run_build,
        ),
        ("inspect", "summarize a store", add_inspect_arguments, run_inspect),
        ("verify", "recompute a store's checksums", add_verify_arguments, run_verify),
        (
            "split",
            "write a split's train / val / test / test-control cells as h5ad files",
            add_split_arguments,
            run_split,
        ),
    ):
        parser = data_sub.add_parser(name, help=help_text, description=help_text)
        add_args(parser)
        parser.set_defaults(func=run)
