"""``latentcell launch-config NAME``: the path of a ready-to-use ``accelerate launch`` config.

The shipped YAMLs name their DeepSpeed JSON as ``launch/deepspeed/zeroN.json``, and Accelerate
reads that path relative to the working directory, not to the YAML (it only copies it into
``ACCELERATE_DEEPSPEED_CONFIG_FILE``). So this command prints, for the DeepSpeed configs, a
copy whose ``deepspeed_config_file`` is absolute, written atomically under
``$XDG_CACHE_HOME/latentcell/launch/`` (default ``~/.cache``); the others need no rewriting and
are printed where they are installed. Use it from any directory:

    accelerate launch --config_file "$(latentcell launch-config zero2)" -m latentcell.launch ...

The trainer also accepts the repository's own YAMLs from anywhere: a relative
``launch/...`` JSON path that does not exist from the working directory is looked up in this
package (``trainer/deepspeed_config.py``). Imports nothing heavy: it runs before any training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.deepspeed_config import LAUNCH_DATA, shipped_launch_file

NAMES = ("single", "ddp", "ddp_multinode", "zero1", "zero2", "zero3")
_DS_LINE = re.compile(r"^(\s*deepspeed_config_file:\s*)(\S.*?)\s*$", re.MULTILINE)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentcell" / "launch"


def add_launch_config_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "launch-config",
        help="print the path of an `accelerate launch --config_file` that works from any directory",
        description="Print the path of a shipped Accelerate config, with its DeepSpeed JSON "
        "path made absolute. NAME: " + ", ".join(NAMES) + ".",
    )
    parser.add_argument("name", metavar="NAME", help=" | ".join(NAMES))
    parser.set_defaults(func=_print_launch_config)


def _print_launch_config(args: argparse.Namespace) -> int:
    print(launch_config(args.name))
    return 0


def launch_config(name: str) -> Path:
    """The path of config ``name``, ready for ``accelerate launch --config_file``."""
    if name not in NAMES:
        raise DataValidationError(
            "launch-config", "NAME", f"unknown launch config {name!r}",
            "use one of " + ", ".join(NAMES),
        )  # fmt: skip
    source = LAUNCH_DATA / "accelerate" / f"{name}.yaml"
    text = source.read_text()
    match = _DS_LINE.search(text)
    if match is None:
        return source
    value = match.group(2).strip("'\"")
    target = shipped_launch_file(value)
    if target is None:  # a shipped YAML always names a shipped JSON
        raise DataValidationError(source, "deepspeed_config_file", f"{value} is not shipped",
                                  "reinstall latentcell")  # fmt: skip
    header = f"# Written by `latentcell launch-config {name}` from {source}\n"
    resolved = header + _DS_LINE.sub(lambda m: m.group(1) + json.dumps(str(target)), text)
    out = cache_dir() / f"{name}.yaml"
    if not (out.is_file() and out.read_text() == resolved):
        _write_atomic(out, resolved)
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Temporary sibling, then rename: concurrent launches never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
