"""Stopping a run cleanly on SIGTERM or Ctrl-C (SIGINT).

A scheduler's SIGTERM (SLURM's ``scancel``, a preempted node, ``kill``) or a Ctrl-C used to
kill the run wherever it was: the last checkpoint could be far behind and MLflow kept the run
RUNNING forever. With :class:`StopRequest` installed, the first signal only sets a flag. The
loop finishes the current step; every process learns of any process's flag through the
per-step all-reduce the non-finite-loss guard already does (no collective is added), so all
stop at the same step. They save a checkpoint, end the MLflow run as KILLED, print one line,
and leave with :class:`TrainingStopped`; the CLI turns it into exit code 128 + signal.

A second signal aborts at once with the signal's default action. The half-written checkpoint
stays in its hidden temp directory, which resume never picks. Launchers forward signals:
``torchrun`` and ``accelerate launch`` re-send what they got to their workers, and
``scancel`` and a terminal's Ctrl-C reach the workers directly as well, so a worker usually
sees the same signal twice within milliseconds. A repeat within ``GRACE_S`` of the first
counts as the same request. The torchrun agent waits 30 s for its workers after forwarding,
then SIGKILLs them; a checkpoint that takes longer is lost (the previous one stays). Python
runs handlers between bytecodes, so a process blocked inside a collective reacts when it
returns.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["GRACE_S", "StopRequest", "TrainingStopped"]

GRACE_S = 1.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """The run stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}"
        )


class StopRequest:
    """SIGTERM/SIGINT handlers for the duration of a ``with`` block (main thread only;
    elsewhere, e.g. a run inside a worker thread, signals keep their usual meaning)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            return
        if now - self._first < GRACE_S:  # the launcher's forwarded copy of the first
            return
        signal.signal(signum, signal.SIG_DFL)  # second request: die now
        os.kill(os.getpid(), signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
