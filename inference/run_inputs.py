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


class TrainedLabels:
    """The perturbation labels of a run-backed numpy predictor (cvae, latent-delta,
    masked-diffusion; torch and ONNX alike): ``settings`` holds ``labels``, ``trained``,
    ``control_label`` and ``columns``; ``self.labels`` and ``self.source`` are set by the
    predictor. A subclass says what a label's training carried (``carried_by``: "training
    pair" ...), what the model lacks without it (``lacks``), whether the control label is a
    condition of its own (``control_is_label``) and any further fix (``train_fix``)."""

    carried_by = "training cell"
    lacks = "the model has no trained embedding for it"
    control_is_label = False
    train_fix = ""

    @property
    def run_labels(self):
        from latentcell.inference.predict import RunLabels

        return RunLabels.from_settings(self.settings)

    def is_trained(self, label: str) -> bool:
        s = self.settings
        if not self.control_is_label and label == s["control_label"]:
            return False
        return label in self.labels and label in s["trained"]

    def _label_code(self, label: str) -> int:
        """The label's code, or one error line naming why it has no trained parameters."""
        if self.is_trained(label):
            return self.labels.index(label)
        s = self.settings
        is_control = label == s["control_label"] and not self.control_is_label
        why = ("the control label is not a perturbation" if is_control
               else "not in the run's perturbation vocabulary" if label not in self.labels
               else f"no {self.carried_by} carried it (the run's split held it out)")  # fmt: skip
        trained = [x for x in s["trained"] if x != s["control_label"]]
        raise DataValidationError(
            self.source, f"perturbation {label!r}", f"{why}, so {self.lacks}",
            f"predict one of the run's trained perturbations ({', '.join(trained[:8])}"
            f"{', ...' if len(trained) > 8 else ''}){self.train_fix}",
        )  # fmt: skip
