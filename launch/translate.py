"""``latentcell predict --run RUN --cells IN.h5ad --to protein|rna --out OUT.h5ad``: translation
with a run of a translating family (multiomics), beside the perturbation paths of ``predict``.

``--to protein``: the cells' RNA counts (X, matched to the run's genes by name) -> the
predicted protein counts in ``obsm['protein_counts']`` (a DataFrame named by the run's
proteins); measured protein counts the file already holds move to
``obsm['protein_counts_measured']``. ``--to rna``: the cells' protein counts -> the predicted
RNA counts in X, on the run's genes (the input's X is not kept). Predicted counts are the NB
means at the run's median training library (``inference/multiomics_translator.py``).
``--protein-key`` reads and writes another obsm key than the run's. The file is written to
a temporary sibling and renamed.

Flags of the perturbation paths (``--controls``, ``--perturbations``, ``--baseline``,
``--mode``, ...) mean nothing here and are refused in one line, as ``--cells`` / ``--to``
are on a perturbation run.
"""

from __future__ import annotations

import argparse
import time

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["refuse_translation_flags", "run_translate"]

# (flag, attribute, the value it has when not given)
PERTURBATION_FLAGS = (
    ("--controls", "controls", None), ("--perturbations", "perturbations", None),
    ("--cells-per-perturbation", "cells_per_perturbation", None),
    ("--baseline", "baseline", None), ("--mode", "mode", None), ("--steps", "steps", None),
    ("--guidance", "guidance", None), ("--train", "train", None), ("--split", "split", None),
    ("--store", "store", None), ("--vae-run", "vae_run", None),
    ("--pert-col", "pert_col", None), ("--control-label", "control_label", None),
    ("--cell-type-col", "cell_type_col", None), ("--batch-col", "batch_col", None),
    ("--basal", "basal", "set"), ("--target-effect", "target_effect", False),
    ("--unseen", "unseen", "error"), ("--unseen-cell-type", "unseen_cell_type", "error"),
    ("--seed", "seed", 0),
)  # fmt: skip


def refuse_translation_flags(args: argparse.Namespace) -> None:
    """Without ``--to``: ``--cells`` and ``--protein-key`` belong to translation."""
    for flag, value in (("--cells", args.cells), ("--protein-key", args.protein_key)):
        if value is not None:
            raise DataValidationError(
                "latentcell predict", flag, "it belongs to translation (--to protein|rna)",
                f"add --to protein|rna with a multiomics --run, or drop {flag}",
            )  # fmt: skip


def _check_flags(args: argparse.Namespace) -> None:
    given = [flag for flag, attr, unset in PERTURBATION_FLAGS if getattr(args, attr) != unset]
    if given:
        raise DataValidationError(
            "latentcell predict", given[0], "translation (--to) takes a run, --cells and --out "
            "only", f"drop {' '.join(given)} (they are for perturbation prediction)",
        )  # fmt: skip
    if not args.run:
        raise DataValidationError(
            "latentcell predict", "--run", "translation needs a trained run",
            "pass --run DIR of `latentcell train multiomics`",
        )  # fmt: skip
    if not args.cells:
        raise DataValidationError(
            "latentcell predict", "--cells", "translation needs the cells to translate",
            f"pass --cells IN.h5ad (its {'RNA counts in X' if args.to == 'protein' else 'protein counts in obsm'})",
        )  # fmt: skip


def load_translator(run: str, weights: str):
    """The translator of ``run``'s family (``families.registry``: ``translator``)."""
    from latentcell.families import FAMILIES, family_of_run

    family = family_of_run(run)
    if family.translator is None:
        translating = "|".join(n for n, f in FAMILIES.items() if f.translator)
        raise DataValidationError(
            run, "--to", f"a {family.name} run does not translate between modalities",
            f"pass a run of latentcell train {translating}, or drop --to/--cells to predict "
            "perturbations",
        )  # fmt: skip
    return family.load("translator")(run, weights)


def run_translate(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.data_pipelines.read_h5ad import read_h5ad

    start = time.perf_counter()
    _check_flags(args)
    translator = load_translator(args.run, args.weights)
    cells = read_h5ad(args.cells, "--cells")
    out = translator.translate_file(cells, args.to, args.cells, args.protein_key)
    write_h5ad_atomic(out, args.out)
    summary = {
        "out": args.out, "translator": translator.name, "to": args.to, "n_cells": out.n_obs,
        "n_features": len(translator.proteins if args.to == "protein" else translator.genes),
        "field": f"obsm['{args.protein_key or translator.protein_key}']"
        if args.to == "protein" else "X",
        "seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip
    from latentcell.launch.next_steps import after_translate, finish

    finish(summary, after_translate(summary), args.json)
    return 0
