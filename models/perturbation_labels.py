"""Perturbation labels -> the genes they perturb: ``STAT1``, ``STAT1+IRF1``, ``STAT1+ctrl``.

Plain Python (no torch): the encoders, the baselines and the torch-free ONNX runtime all read
labels the same way, so a label means the same genes in training and in a service.
"""

from __future__ import annotations

from collections.abc import Sequence

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["perturbation_genes", "split_genes", "target_columns", "untrained_parts"]

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
