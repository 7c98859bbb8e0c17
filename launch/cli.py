"""The ``latentcell`` command: one parser, one subcommand per stage.

Each package registers its own subcommands, so this file only dispatches. Bad input
(DataValidationError) prints one ``error:`` line and exits 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from latentcell.data_pipelines.cli import add_data_commands
    from latentcell.evaluation.cli import add_evaluate_commands
    from latentcell.launch.demo import add_demo_command
    from latentcell.launch.export import add_export_command
    from latentcell.launch.generate import add_generate_command
    from latentcell.launch.predict import add_predict_command
    from latentcell.launch.train import add_train_command

    parser = argparse.ArgumentParser(
        prog="latentcell", description="Generative models of single cells."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    add_train_command(sub)
    add_generate_command(sub)
    add_predict_command(sub)
    add_evaluate_commands(sub)
    add_export_command(sub)
    add_demo_command(sub)
    version = sub.add_parser("version", help="print the installed version")
    version.set_defaults(func=_print_version)
    return parser


def _print_version(_args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(f"latentcell {version('latentcell')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataValidationError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
