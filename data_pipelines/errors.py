"""One error type for bad input, so the CLI can print a single line and exit non-zero."""

from __future__ import annotations


class DataValidationError(ValueError):
    """Bad input data. The message names the file, the field and the fix.

    Raised before anything is written at the destination; the CLI prints
    ``error: <message>`` and exits with code 2.
    """

    def __init__(self, path: str, field: str, problem: str, fix: str):
        self.path, self.field, self.problem, self.fix = str(path), field, problem, fix
        super().__init__(f"{self.path}: {field}: {problem}. Fix: {fix}")
