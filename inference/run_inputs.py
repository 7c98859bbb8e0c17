"""Checks every run-backed predictor applies to what it is given, torch-free (the ONNX runtime
shares them): log1p controls of the run's width, and no ``--unseen`` fallback a family did
not learn. One place, so a torch predictor and its ONNX twin refuse with the same line."""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["checked_controls", "refuse_fallbacks"]


def checked_controls(control, genes, source) -> np.ndarray:
    """``control`` as float32 (cells, len(genes)) log1p expression, else one error line."""
    control = np.asarray(control, dtype=np.float32)
    if control.ndim != 2 or control.shape[1] != len(genes):
        raise DataValidationError(
            source, "controls", f"shape {control.shape}",
            f"pass (cells, {len(genes)}) log1p expression on the run's genes in order",
        )  # fmt: skip
    return control


def refuse_fallbacks(source, options, what: str, why: str, fix: str = "") -> None:
    """ST's ``--unseen generic`` / ``--unseen-cell-type unknown`` (``options``: PredictOptions
    or the runtime's arguments) on a ``what`` ("a cvae run") that learned no such parameters
    (``why``): refused rather than ignored."""
    for flag, value in (("--unseen", options.unseen),
                        ("--unseen-cell-type", options.unseen_cell_type)):  # fmt: skip
        if value != "error":
            raise DataValidationError(
                source, flag, f"{what} has no {value!r} fallback ({why})", f"drop {flag}{fix}"
            )
