"""User-facing failures, and the one rule that turns any failure into one line at a CLI's edge.

``UserInputError`` is what a user can fix (bad data, a bad config key, a corrupt file);
``DataValidationError`` is its usual form, naming the file, the field and the fix. Both the
``latentcell`` command and the torch-free runtime's command run through :func:`run_cli`, so
every command fails the same way: one ``error:`` line on stderr, exit code 2 for what the user
can fix and 1 for anything else, and the traceback only with ``--debug`` or
``LATENTCELL_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

DEBUG_ENV = "LATENTCELL_DEBUG"
VERBOSE_ENV = "LATENTCELL_VERBOSE"  # set by ``-v``: the libraries' own output is shown
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


class UserInputError(ValueError):
    """Something the user can fix; its message is the whole error line (without ``error:``)."""


class LatentcellWarning(UserWarning):
    """A warning of ours: something the user should read (the console shows these and hides
    the libraries' warnings unless ``--verbose``, see ``launch/console.py``)."""


class DataValidationError(UserInputError):
    """Bad input data. The message names the file, the field and the fix.

    Raised before anything is written at the destination; the CLI prints
    ``error: <message>`` and exits with code 2.
    """

    def __init__(self, path: str, field: str, problem: str, fix: str):
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: {field}: {problem}. Fix: {fix}")

    def __reduce__(self):  # picklable, so it can cross from a DataLoader worker
        return type(self), (self.path, self.field, self.problem, self.fix)


class CorruptDataError(DataValidationError):
    """A stored unit (Zarr chunk, WebDataset shard) that does not match what was written."""


_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.ENOSPC: "free disk space or write elsewhere",
    errno.EISDIR: "pass a file, not a directory",
    errno.ENOTDIR: "check the path",
    errno.EROFS: "write to a writable location",
}


def one_line(err: BaseException) -> tuple[str, int]:
    """(the ``error:`` line, the exit code) for any exception."""
    if isinstance(err, UserInputError):
        return f"error: {err}", EXIT_USER
    if isinstance(err, OSError) and err.errno in _OS_FIXES:
        where = err.filename if err.filename is not None else "file system"
        problem = err.strerror or type(err).__name__
        return f"error: {where}: {problem}. Fix: {_OS_FIXES[err.errno]}", EXIT_USER
    detail = " ".join(str(err).split())[:300] or "no message"
    return (
        f"error: internal error ({type(err).__name__}: {detail}). Fix: rerun with --debug "
        f"(or {DEBUG_ENV}=1) for the traceback and report it",
        EXIT_INTERNAL,
    )


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (anywhere on the command line) or LATENTCELL_DEBUG=1 asked for
    tracebacks, and the arguments without ``--debug``."""
    rest = [a for a in argv if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or len(rest) != len(argv), rest


def verbose_console() -> bool:
    """Whether the user asked for the libraries' own output (``-v`` / ``LATENTCELL_VERBOSE``;
    see ``launch/console.py``), for code that must mute a library's ``print`` itself."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(command: Callable[[], int | None], debug: bool) -> int:
    """Run one parsed command; any failure becomes one line on stderr and an exit code."""
    try:
        code = int(command() or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # the reader went away (`latentcell data inspect S | head`): stop quietly, as Unix
        # tools do; stdout goes to devnull so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the edge of the program: one line, never a trace
        if debug:
            traceback.print_exc()
        line, code = one_line(err)
        # one write: the processes of a launch share the pipe, and print's separate write of
        # the newline let two ranks' lines run together
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return code
