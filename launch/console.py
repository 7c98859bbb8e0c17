"""What a command prints: our own lines and the progress bar; the libraries' chatter only with
``-v`` / ``--verbose`` (anywhere on the command line) or ``LATENTCELL_VERBOSE=1``.

Left alone, a training run prints DeepSpeed's "Setting accelerator to CPU" (on stdout, once
per process), MLflow's database-migration notices, torch's export and deprecation
warnings, and cell-eval's progress bars and notices; a 200-step ZeRO-3 log was 1,616 lines,
804 of them ``FutureWarning``. :func:`quiet_console` mutes them for the duration of one
command and restores every setting afterwards (tests call ``main`` in-process):

- Python warnings are ignored except ours (``LatentcellWarning``: something the user must
  act on, e.g. a tracking backend that went down), which print as one ``warning:`` line. The
  rule goes by category, not by module: torch's C++ warnings are attributed to the line of
  ours that called into torch;
- the loggers of the libraries below drop to ERROR, and MLflow's own configuration is told
  the same through ``MLFLOW_LOGGING_LEVEL`` (it resets its logger levels when imported);
- DeepSpeed is told the accelerator (``DS_ACCELERATOR=cpu``) on a machine without a GPU, so
  it does not print that it guessed one.

Errors are never hidden: they leave through ``errors.run_cli`` as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from latentcell.data_pipelines.errors import VERBOSE_ENV, LatentcellWarning, verbose_console

__all__ = ["VERBOSE_ENV", "quiet_console", "verbose_requested"]

VERBOSE_FLAGS = ("-v", "--verbose")
# Library loggers that speak at INFO/WARNING during normal runs.
NOISY_LOGGERS = ("DeepSpeed", "mlflow", "alembic", "torch", "torch._export", "torch.export",
                 "torch.onnx", "torch._dynamo", "torch.distributed", "accelerate", "cell_eval",
                 "pdex", "numba", "urllib3", "httpx", "huey", "py.warnings")  # fmt: skip
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # torch sets its registered loggers' levels itself when imported (torch.onnx's 12
    # "torchvision is not installed" lines per export, torch.export's specialization notes)
    "TORCH_LOGS": "-torch,-onnx,-export,-dynamo,-distributed",
    # tqdm bars whose owner did not ask for them explicitly (cell-eval's, pdex's: ~1,000
    # redraws per evaluation); the training bar passes disable= itself and stays
    "TQDM_DISABLE": "1",
}


def verbose_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``-v``/``--verbose`` (anywhere) or ``LATENTCELL_VERBOSE=1`` asked for the
    libraries' output, and the arguments without those flags."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    return verbose_console() or len(rest) != len(argv), rest


@contextlib.contextmanager
def _quiet_env() -> Iterator[None]:
    """Environment defaults for the libraries (explicit user settings win), restored after."""
    wanted = dict(QUIET_ENV)
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        wanted["DS_ACCELERATOR"] = "cpu"
    added = [k for k in wanted if k not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _has_cuda() -> bool:
    """A GPU is visible: asked of torch only if it is already loaded (importing it costs a
    second, and a command that never imports torch never imports DeepSpeed either), else
    of the NVIDIA driver's device files."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


@contextlib.contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """Mute third-party warnings and log lines for one command (nothing if ``verbose``)."""
    if verbose:  # the library code that mutes prints itself reads the environment
        added = VERBOSE_ENV not in os.environ
        os.environ.setdefault(VERBOSE_ENV, "1")
        try:
            yield
        finally:
            if added:
                os.environ.pop(VERBOSE_ENV, None)
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), _quiet_env():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=LatentcellWarning)
        warnings.showwarning = _one_line
        for logger in loggers:
            logger.setLevel(logging.ERROR)
            # a filter as well: a library that sets its logger's level when it is imported
            # (DeepSpeed does) keeps the filter
            logger.addFilter(_errors_only)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
                logger.removeFilter(_errors_only)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """``warning: <message>`` on stderr for ours: their file and line say nothing to a user
    (``--verbose`` keeps Python's format). Others are dropped here too, since libraries that
    force their warnings through (``simplefilter("always")``, as MLflow does) bypass the
    filters but not this function."""
    if issubclass(category, LatentcellWarning):
        (file or sys.stderr).write(f"warning: {message}\n")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
