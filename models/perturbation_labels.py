"""Perturbation labels -> the genes they perturb: ``STAT1``, ``STAT1+IRF1``, ``STAT1+ctrl``;
and which labels (perturbations, cell types) a run has trained parameters for.

Plain Python (no torch): the encoders, the baselines and the torch-free ONNX runtime all read
labels the same way, so a label means the same genes in training and in a service, and the
torch and ONNX predictors refuse (or route) the same untrained labels with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

from latentcell.data_pipelines.errors import DataValidationError

__all__ = [
    "UNKNOWN_CELL_TYPE_FIX",
    "UNSEEN_CELL_TYPE",
    "UNTRAINED_CELL_TYPE_FIX",
    "perturbation_genes",
    "split_genes",
    "target_columns",
    "untrained_cell_type",
    "untrained_parts",
]

_VOCAB = "perturbation labels"  # the "file" of errors about the label vocabulary itself


def split_genes(
    label: str, separator: str = "+", control_label: str = "non-targeting"
) -> tuple[str, ...]:
    """The genes a label perturbs, as a tuple in written order; () for the control."""
    pieces = [p.strip() for p in label.split(separator)]
    if any(not p for p in pieces):
        raise DataValidationError(
            _VOCAB,
            "perturbation",
            f"label {label!r} has an empty gene name around {separator!r}",
            f"write combinations as 'A{separator}B', or set combo_separator to the one used",
        )
    return tuple(dict.fromkeys(p for p in pieces if p != control_label))


def target_columns(
    label: str, index: dict[str, int], separator: str = "+", control_label: str = "non-targeting"
) -> list[int]:
    """Positions (``index``: gene name -> column) of the label's genes that are measured."""
    return [index[g] for g in split_genes(label, separator, control_label) if g in index]


def perturbation_genes(
    labels: Sequence[str], separator: str = "+", control_label: str = "non-targeting"
) -> tuple[str, ...]:
    """The gene vocabulary of ``labels``: every gene once, in order of first appearance.

    First appearance (not sorted) so that appending labels never reorders existing genes.
    """
    genes = (g for label in labels for g in split_genes(label, separator, control_label))
    return tuple(dict.fromkeys(genes))


def untrained_parts(
    label: str,
    trained: Sequence[str] | None,
    encoder: str,
    separator: str = "+",
    control_label: str = "non-targeting",
) -> list[str]:
    """What of ``label`` never had a trained embedding ([] when it is usable): the label
    itself for a onehot encoder, its genes absent from every ``trained`` label for
    gene_table; never anything for external vectors (fixed, not learned) or for runs that
    did not record ``trained`` (None)."""
    if trained is None or encoder == "external":
        return []
    if encoder == "onehot":
        return [] if label in trained else [label]
    known = set(perturbation_genes(trained, separator, control_label))
    return [g for g in split_genes(label, separator, control_label) if g not in known]


# What a predictor does with a cell type it has no trained parameters for: refuse (default),
# or the unknown cell type (the learned vector of ``model.cell_type_dropout``; with
# ``basal="train"`` the set's own mean as basal).
UNSEEN_CELL_TYPE = ("error", "unknown")

UNTRAINED_CELL_TYPE_FIX = (
    "predict with --unseen-cell-type unknown (the unknown cell type a run learns with "
    "model.cell_type_dropout > 0, or without cell-type conditioning the set's own mean as "
    "basal), or use a run whose split trains on it"
)
UNKNOWN_CELL_TYPE_FIX = (
    "train with model.cell_type_dropout > 0 (e.g. 0.2), or with "
    "model.cell_type_conditioning=false, to use --unseen-cell-type unknown"
)


def untrained_cell_type(
    cell_type: str,
    cell_types: Sequence[str],
    trained: Sequence[str] | None,
    with_mean: Sequence[str] | None,
) -> str:
    """Why a run has no trained parameters for ``cell_type`` ("" when it has them).

    ``cell_types``: the run's cell-type vocabulary. ``trained``: the types that had training
    sets, for a cell-type-conditioned run (None: not conditioned, or a run from before the
    record, as ``untrained_parts``). ``with_mean``: the types with a training-control mean,
    for a ``basal="train"`` run (None otherwise)."""
    if cell_type not in cell_types:
        return f"{cell_type!r} is not a cell type of the run's store {list(cell_types)[:20]}"
    if trained is not None and cell_type not in trained:
        return (
            f"no training set had cell type {cell_type!r} (the split held out all its "
            "perturbed cells), so the model's cell-type row for it was never trained"
        )
    if with_mean is not None and cell_type not in with_mean:
        return (
            f"no training control had cell type {cell_type!r}, so model.basal=train has no "
            "training-control mean for it"
        )
    return ""
