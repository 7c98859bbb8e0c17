"""The ``latentcell`` command: one parser, one subcommand per stage.

Each package registers its own subcommands, so this file only dispatches. Every failure
leaves through ``errors.run_cli``: one ``error:`` line, exit 2 for bad input (1 for anything
else), the traceback only with ``--debug`` or ``LATENTCELL_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import sys

from latentcell.data_pipelines.errors import debug_requested, run_cli
from latentcell.data_pipelines.lazy_commands import CommandParser


def build_parser() -> argparse.ArgumentParser:
    """Every command by name and one-line help; a command's options and code are imported
    only when it is chosen (``lazy_commands``), so ``latentcell --help`` starts fast."""
    from latentcell.benchmarks.cli import add_benchmark_commands
    from latentcell.data_pipelines.cli import add_data_commands
    from latentcell.evaluation.cli import add_evaluate_commands
    from latentcell.launch.demo import add_demo_command
    from latentcell.launch.export import add_export_command
    from latentcell.launch.generate import add_generate_command
    from latentcell.launch.launch_config import add_launch_config_command
    from latentcell.launch.predict import add_predict_command
    from latentcell.launch.train import add_train_command

    parser = CommandParser(prog="latentcell", description="Generative models of single cells.")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure (any position)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="also show the libraries' warnings and log lines (any position)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    add_train_command(sub)
    add_generate_command(sub)
    add_predict_command(sub)
    add_evaluate_commands(sub)
    add_export_command(sub)
    add_benchmark_commands(sub)
    add_demo_command(sub)
    add_launch_config_command(sub)
    version = sub.add_parser("version", help="print the installed version")
    version.set_defaults(func=_print_version)
    return parser


def _print_version(_args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(f"latentcell {version('latentcell')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from latentcell.launch.console import quiet_console, verbose_requested

    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    verbose, argv = verbose_requested(argv)
    args = build_parser().parse_args(argv)
    with quiet_console(verbose):
        return run_cli(lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
