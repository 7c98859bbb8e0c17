"""``latentcell train <family>``: resolve the run config, then hand it to the one loop.

    latentcell train vae [--config F.toml] [--set data.path=STORE --set run.dir=DIR ...]
                         [--resume auto|PATH] [--print-config] [--json]

Identical under ``accelerate launch [args] -m latentcell.launch train vae ...``: the
launcher's environment decides DDP / DeepSpeed / nodes, never this command. Each family is
its own subcommand, so ``latentcell train vae --help`` lists the VAE's config sections and
their defaults (its config class is imported only then).

A run stopped by SIGTERM or Ctrl-C saves a checkpoint, says so in one line, and exits with
128 + the signal's number (143, 130), as a process killed by it would.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing


def add_train_command(sub: argparse._SubParsersAction) -> None:
    from latentcell.data_pipelines.lazy_commands import lazy_command
    from latentcell.families import FAMILIES

    listing = "\n".join(f"  {name:<13} {f.summary}" for name, f in FAMILIES.items())
    parser = sub.add_parser(
        "train", help="train a model family (see `latentcell train --help`)",
        description=f"Train one run of a model family.\n\nfamilies:\n{listing}\n\n"
        "`latentcell train FAMILY --help` lists the family's config sections.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    families = parser.add_subparsers(dest="stage", required=True, metavar="FAMILY")
    for name, family in FAMILIES.items():
        lazy_command(families, name, family.summary, add_family_arguments, run_train,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def config_sections(config_class: type, width: int = 88) -> str:
    """The run config's sections, each with its keys and defaults (``--help`` text)."""
    from latentcell.trainer.config import config_to_dict

    defaults = config_to_dict(config_class())
    types = typing.get_type_hints(config_class)
    lines = ["config sections (set any key with --set SECTION.KEY=VALUE, or in --config):"]
    for f in dataclasses.fields(config_class):
        section_class = types[f.name]
        doc = (section_class.__doc__ or "").strip()
        section = defaults.get(f.name, {})
        keys = ", ".join(f"{k}={v!r}" for k, v in section.items()) or "(no keys set by default)"
        lines.append(f"  [{f.name}]")
        if doc and not doc.startswith(f"{section_class.__name__}("):  # not dataclass's own
            lines += textwrap.wrap(_first_sentence(doc), width, initial_indent=" " * 4,
                                   subsequent_indent=" " * 4)  # fmt: skip
        lines += textwrap.wrap(keys, width, initial_indent=" " * 4, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def add_family_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``latentcell train FAMILY``; the description lists its config sections."""
    from latentcell.families import family_named

    family = family_named(parser.prog.split()[-1])
    parser.description = f"Train one {family.name} run: {family.summary}.\n\n" + config_sections(
        family.config_class()
    )
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
    parser.add_argument(
        "--json", action="store_true", help="end with one JSON summary line (for scripts)"
    )


def run_train(args: argparse.Namespace) -> int:
    from latentcell.families import family_named
    from latentcell.families.train import load_family_config, train_family
    from latentcell.launch.next_steps import after_train, finish
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
        finish(summary, after_train(family.name, summary), args.json)
    return 0
