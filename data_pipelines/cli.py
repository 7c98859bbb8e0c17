"""``latentcell data synth|build|inspect|verify|split``: thin wrappers over the library functions.

Registered by reference (``lazy_commands``): choosing ``data inspect`` imports the store
readers, not the builder, the synthesizer or torch. ``@FILE`` stands for the arguments in FILE,
one per line: scBaseCount's ~61,000 input paths do not fit on one command line
(``latentcell data build @inputs.txt --out store.zarr``).
"""

from __future__ import annotations

import argparse

from latentcell.data_pipelines.lazy_commands import DefaultsHelpFormatter, lazy_command

_MODULE = "latentcell.data_pipelines."
# name -> (one-line help, module, add-arguments function, run function)
DATA_COMMANDS = {
    "synth": ("write a synthetic VCC- or scBaseCount-schema h5ad", "synth",
              "add_synth_arguments", "run_synth"),
    "build": ("validate h5ad inputs and write a Zarr v3 or WebDataset store", "build",
              "add_build_arguments", "run_build"),
    "inspect": ("summarize a store", "inspect_store", "add_inspect_arguments", "run_inspect"),
    "verify": ("recompute a store's checksums", "inspect_store", "add_verify_arguments",
               "run_verify"),
    "split": ("write a split's train / val / test / test-control cells as h5ad files",
              "split_files", "add_split_arguments", "run_split"),
}  # fmt: skip


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="synthesize, build, inspect, verify and split cell stores")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, (help_text, module, add_args, run) in DATA_COMMANDS.items():
        lazy_command(data_sub, name, help_text, f"{_MODULE}{module}:{add_args}",
                     f"{_MODULE}{module}:{run}",
                     formatter_class=DefaultsHelpFormatter,
                     fromfile_prefix_chars="@")  # fmt: skip
