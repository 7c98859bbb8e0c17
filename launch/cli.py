"""The ``latentcell`` command: one parser, one subcommand per stage."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentcell")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    args = parser.parse_args(argv)
    if args.command == "version":
        print("latentcell 0.1.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
