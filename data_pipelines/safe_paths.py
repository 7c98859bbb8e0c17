"""The one path rule: a file named by a manifest, metadata file or archive stays in its directory.

Stores, bundles and tar shards name their parts by relative path. Those names are data, and
data can be edited by anyone who can write the directory (a shared file system, a copied
bundle), so every name read back goes through :func:`resolve_inside`: it must be a plain
relative path (no absolute path, drive, backslash, ``..`` or NUL), and the file it resolves
to, symlinks followed, must lie inside the directory. A name that breaks the rule is a
``DataValidationError`` naming the file that holds it and the field, never a read elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import DataValidationError

__all__ = ["check_relative_name", "name_problem", "resolve_inside"]


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain relative POSIX path, or None when it is one."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a non-empty string"
    if "\0" in name or "\\" in name:
        return f"{name!r} holds a NUL or a backslash"
    pure = PurePosixPath(name)
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return f"{name!r} is an absolute path"
    if ".." in pure.parts:
        return f"{name!r} climbs out of its directory with '..'"
    return None


def check_relative_name(name: object, source: str | os.PathLike, field: str) -> str:
    """``name`` when it is a plain relative path, else a DataValidationError on ``source``."""
    problem = name_problem(name)
    if problem is not None:
        raise DataValidationError(
            source, field, problem, "names must be relative paths inside their directory; "
            "restore the file from its original build or export",
        )  # fmt: skip
    return name


def resolve_inside(
    root: str | os.PathLike, name: object, source: str | os.PathLike, field: str
) -> Path:
    """``root / name`` after checking that it stays inside ``root`` (symlinks followed).

    ``source`` is the file the name was read from (a manifest, metadata.json, a shard) and
    ``field`` where in it; both go into the error.
    """
    check_relative_name(name, source, field)
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / name))
    if target != base and base not in target.parents:
        raise DataValidationError(
            source, field, f"{name!r} resolves to {target}, outside {base} (a symlink leads out)",
            "replace the link with the file itself, or rebuild / re-export",
        )  # fmt: skip
    return target
