"""The DeepSpeed JSON an ``accelerate launch`` names, as an absolute path, from any directory.

Accelerate copies a YAML's ``deepspeed_config_file`` into ``ACCELERATE_DEEPSPEED_CONFIG_FILE``
unchanged and every process reads it relative to its working directory, so the shipped
configs (``launch/deepspeed/zeroN.json``) only worked from the repository root. The trainer
resolves the path before DeepSpeed starts: as given when it exists, else the copy shipped with
the package (``launch/`` is package data beside this package; looked up by path, so the
trainer imports nothing from the entrypoint layer). ``latentcell launch-config`` writes
YAMLs whose path is already absolute.
"""

from __future__ import annotations

from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["LAUNCH_DATA", "resolve_deepspeed_config", "shipped_launch_file"]

LAUNCH_DATA = Path(__file__).resolve().parents[1] / "launch"  # accelerate/, deepspeed/, configs/


def shipped_launch_file(value: str) -> Path | None:
    """The packaged file a relative ``launch/...`` path names, if there is one."""
    parts = Path(value).parts
    if Path(value).is_absolute() or len(parts) < 2 or parts[0] != "launch":
        return None
    path = LAUNCH_DATA.joinpath(*parts[1:])
    return path if path.is_file() else None


def resolve_deepspeed_config(value: str, where: str = "ACCELERATE_DEEPSPEED_CONFIG_FILE") -> Path:
    """``value`` as an absolute path: as given if it exists (relative to the working directory,
    as Accelerate reads it), else, for ``launch/...``, the file shipped in this package."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if (shipped := shipped_launch_file(value)) is not None:
        return shipped
    raise DataValidationError(
        where, "deepspeed_config_file", f"{value} does not exist (from {Path.cwd()})",
        "give an absolute path, or launch with --config_file \"$(latentcell launch-config "
        "zero2)\" (zero1, zero2, zero3)",
    )  # fmt: skip
