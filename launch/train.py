"""``latentcell train <stage>``: resolve the run config, then hand it to the one loop.

    latentcell train vae [--config F.toml] [--set data.path=STORE --set run.dir=DIR ...]
                         [--resume auto|PATH] [--print-config]

Identical under ``accelerate launch [args] -m latentcell.launch train vae ...``: the
launcher's environment decides DDP / DeepSpeed / nodes, never this command.

A run stopped by SIGTERM or Ctrl-C saves a checkpoint, says so in one line, and exits with
128 + the signal's number (143, 130), as a process killed by it would.
"""

from __future__ import annotations

import argparse
import json


def add_train_command(sub: argparse._SubParsersAction) -> None:
    from latentcell.families import FAMILIES

    listing = "\n".join(f"  {name:<13} {f.summary}" for name, f in FAMILIES.items())
    parser = sub.add_parser(
        "train", help="train a model family (see `latentcell train --help`)",
        description=f"Train one run of a model family.\n\nfamilies:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("stage", choices=list(FAMILIES), metavar="FAMILY",
                        help=f"the model family to train: {', '.join(FAMILIES)}")  # fmt: skip
    parser.add_argument("--config", help="TOML run config (every key has a default)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.max_steps=200 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest checkpoint of run.dir, or a fresh start) or a checkpoint dir",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from latentcell.families import family_named
    from latentcell.families.train import load_family_config, train_family
    from latentcell.trainer.config import config_to_dict
    from latentcell.trainer.loop import TrainingStopped

    family = family_named(args.stage)
    config = load_family_config(family, args.config, args.overrides)
    if args.print_config:
        import tomli_w

        print(tomli_w.dumps(config_to_dict(config)), end="")
        return 0
    try:
        summary = train_family(family, config, resume=args.resume)
    except TrainingStopped as stopped:  # its line is already printed
        return stopped.exit_code
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary))
    return 0
