"""Which real cells play which role in a generation evaluation.

Per condition, the cells are shuffled (seeded) and cut into disjoint parts, each capped at
``max_cells_per_condition``:
- ``reference``: the real cells EVERY method is compared with (all of ``real`` when ``train`` is
  given, else the first part of ``real``);
- ``fit``: real cells that are the ``real_ceiling`` and fit ``gaussian_pca`` and the condition
  classifier (part of ``train`` when given, else the second part of ``real``);
- ``pca``: real cells that choose the HVGs and fit the PCA (``protocol.pca_fit``):
  ``"held_out"`` (default): a further part of ``train`` (else the third part of ``real``), so
  that the reference, the ceiling and the generated cells are all out-of-sample for the PCA;
  ``"reference"``: the reference cells themselves (HVGs on all of ``train`` when given).

A condition whose reference part has fewer than ``min_cells`` cells is skipped and reported
with the reason; ``min_cells="auto"`` is resolved here, from the reference parts' sizes.

Why ``held_out`` is the default: PCA fitted on the reference inflates the reference's spread
along its noise directions, and every other set, real or generated, is projected without that
inflation. Measured on Paul 2015 (GMP, two disjoint thirds of 368 real cells, PCA-50 of 2000
HVGs): total PCA variance 286 (reference, in-sample) vs 152 (the other third); real-vs-real
kNN AUC 0.57, recall 0.06, density 9.0, energy distance 0.61. With the PCA fitted on the third
third: variances 155 vs 152, AUC 0.44, recall 0.93, density 0.98, energy distance 0.08.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.protocol import (
    MIN_CELLS_AUTO,
    GenerationProtocol,
    condition_labels,
    min_cells_floor,
    resolve_min_cells,
    rng_for,
)


@dataclass(frozen=True)
class CellRows:
    """Rows of one AnnData (``None``: all of its cells), with a description for the summary."""

    data: ad.AnnData
    rows: np.ndarray | None
    description: str


@dataclass(frozen=True)
class CellSplit:
    """The evaluated conditions and the real cells of every role."""

    conditions: list[str]
    min_cells: int  # the protocol's min_cells, resolved ("auto" -> a number)
    skipped: dict[str, dict]  # condition -> {"n_cells": reference cells, "reason": why}
    reference: dict[str, np.ndarray]  # rows of ``real``
    fit_data: ad.AnnData
    fit: dict[str, np.ndarray]  # rows of ``fit_data``; may be empty for a condition
    pca: CellRows
    hvg: CellRows
    roles: dict[str, str]  # role -> description, for the summary


def shuffled_rows(labels: np.ndarray, cond: str, seed: int, key: str) -> np.ndarray:
    """The rows of one condition in a seeded order that depends only on (seed, key, cond)."""
    return rng_for(seed, key, cond).permutation(np.flatnonzero(labels == cond))


def _equal_parts(rows: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """``n_parts`` parts of ``len // n_parts`` rows, the remainder going to the last one.

    So the reference and the ceiling (the first two parts) always have equal sizes.
    """
    k = len(rows) // n_parts
    return [rows[i * k : (i + 1) * k] for i in range(n_parts - 1)] + [rows[(n_parts - 1) * k :]]


def _real_parts(
    real: ad.AnnData, has_train: bool, condition_col: str, protocol: GenerationProtocol
) -> dict[str, list[np.ndarray]]:
    """Per condition, its shuffled real rows cut into the parts of the roles (the reference
    first): all of them when train is given, else halves or thirds."""
    n_parts = 1 if has_train else 3 if protocol.pca_fit == "held_out" else 2
    labels = condition_labels(real, condition_col)
    return {
        cond: _equal_parts(shuffled_rows(labels, cond, protocol.seed, "real"), n_parts)
        for cond in sorted(set(labels))
    }


def split_cells(
    real: ad.AnnData, train: ad.AnnData | None, condition_col: str, protocol: GenerationProtocol
) -> CellSplit:
    """Assign real (and training) cells to roles; conditions with too few reference cells skip."""
    held_out = protocol.pca_fit == "held_out"
    cap = protocol.max_cells_per_condition
    parts_by_cond = _real_parts(real, train is not None, condition_col, protocol)
    min_cells = resolve_min_cells(protocol, [len(p[0]) for p in parts_by_cond.values()])
    reference, fit, pca, skipped = {}, {}, {}, {}
    for cond, parts in parts_by_cond.items():
        if len(parts[0]) < min_cells:
            skipped[cond] = {"n_cells": len(parts[0]), "reason": skip_reason(protocol, min_cells)}
            continue
        reference[cond] = parts[0][:cap]
        if train is None:
            fit[cond] = parts[1][:cap]
            pca[cond] = parts[2][:cap] if held_out else reference[cond]
    if not reference:
        counts = {c: v["n_cells"] for c, v in skipped.items()}
        fix = "lower --min-cells or pass more real cells"
        raise DataValidationError(
            "real",
            f"obs['{condition_col}']",
            f"no condition has {min_cells} real reference cells (counts: {counts})",
            "pass more real cells" if protocol.min_cells == MIN_CELLS_AUTO else fix,
        )
    if train is None:
        source, fit_data = "real", real
    else:
        source, fit_data = "train", train
        train_labels = condition_labels(train, condition_col)
        for cond in reference:
            rows = shuffled_rows(train_labels, cond, protocol.seed, "train")
            parts = np.array_split(rows, 2) if held_out else [rows]
            fit[cond] = parts[0][:cap]
            pca[cond] = parts[1][:cap] if held_out else reference[cond]
    pca_rows = np.concatenate(list(pca.values()))
    if len(pca_rows) < 2:
        raise DataValidationError(
            source,
            f"obs['{condition_col}']",
            "fewer than 2 cells of the evaluated conditions are left to fit the PCA",
            "pass more training cells of the evaluated conditions",
        )
    roles = _role_descriptions(train is not None, held_out)
    pca_cells = CellRows(fit_data if held_out else real, pca_rows, roles["pca"])
    if held_out or train is None:
        hvg_cells = CellRows(pca_cells.data, pca_rows, roles["hvg"])
    else:
        hvg_cells = CellRows(train, None, roles["hvg"])
    return CellSplit(
        conditions=list(reference),
        min_cells=min_cells,
        skipped=skipped,
        reference=reference,
        fit_data=fit_data,
        fit=fit,
        pca=pca_cells,
        hvg=hvg_cells,
        roles=roles,
    )


def skip_reason(protocol: GenerationProtocol, min_cells: int) -> str:
    """Why a condition below ``min_cells`` reference cells is not evaluated, in words."""
    if protocol.min_cells == MIN_CELLS_AUTO:
        floor = min_cells_floor(protocol.knn_k)
        return f"fewer than {floor} reference cells, the least the kNN AUC needs (2 * knn_k + 2)"
    return f"fewer than min_cells={min_cells} reference cells (set explicitly)"


def _role_descriptions(has_train: bool, held_out: bool) -> dict[str, str]:
    """Which cells play each role, in words (logged in the summary)."""
    if has_train:
        reference, fit = "real: all cells", "train: first half" if held_out else "train: all cells"
        pca = "train: second half (held out)" if held_out else "the reference cells (in-sample)"
        hvg = pca if held_out else "train: all cells"
    else:
        reference = "real: first third" if held_out else "real: first half"
        fit = "real: second third" if held_out else "real: second half"
        pca = "real: last third (held out)" if held_out else "the reference cells (in-sample)"
        hvg = pca
    return {"reference": reference, "fit": fit, "pca": pca, "hvg": hvg}
