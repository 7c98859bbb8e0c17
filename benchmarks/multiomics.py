"""RNA <-> protein translation on held-out cells: the multiomics family beside ridge regression
(and beside totalVI where scvi-tools is installed), by cross-validation over cells.

    latentcell benchmark multiomics --data CELLS.h5ad --out DIR [--folds 5] [--seed 0]
        [--steps N] [--set KEY=VALUE ...] [--reuse]

The cells are dealt into ``--folds`` folds by one seeded permutation. For each fold the
family trains on the other folds' cells (``latentcell train multiomics`` on a file of them,
``<out>/folds/fold<k>/train.h5ad``, no validation cells: the baseline sees them all too) and
translates the held-out fold both ways; ridge regression is fitted on the same training cells
and genes. Scores (``evaluation/translation.py``): per protein, the Pearson r across held-out
cells of predicted against measured log1p-normalized counts, averaged over the proteins; per
gene the same over the genes the fold's run models (the ``data.n_top_genes`` most variable of
its training cells), and again over those genes detected in at least ``DETECTED`` of the
held-out cells. Each is a mean ± sd over folds. Writes ``results.json`` and ``results.md``.

totalVI runs only when ``import scvi`` works in this environment; it is not installed by
default (it brings jax, lightning and pyro), and the results then say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark multiomics"
DETECTED = 0.1  # a gene counts as detected when at least this fraction of held-out cells has it
ENTRIES = ("multiomics", "ridge")
PAIRED = "multiomics - ridge (paired)"
SCORES = ("rna_to_protein", "protein_to_rna", "protein_to_rna_detected")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="h5ad: RNA counts in X, protein counts "
                        "in obsm['protein_counts'] (see --set data.protein_key)")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for folds, runs, results.json/.md")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment and training seed")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fold "
                        "(default: the family's train.max_steps, 800)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a multiomics config key, e.g. "
                        "model.n_latent=20 (repeatable)")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep finished fold runs in --out")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the fold runs (default: none, untracked)")  # fmt: skip


def _protein_key(overrides: list[str]) -> str:
    keys = [o.split("=", 1)[1] for o in overrides if o.startswith("data.protein_key=")]
    return keys[-1].strip("\"'") if keys else "protein_counts"


def _cells(args):
    """The input, checked once before any fold trains."""
    from latentcell.data_pipelines.paired_counts import protein_counts, rna_counts
    from latentcell.data_pipelines.read_h5ad import read_h5ad

    if args.steps is None:
        from latentcell.trainer.multiomics_stage import DEFAULT_STEPS

        args.steps = DEFAULT_STEPS
    if args.folds < 2 or args.steps < 1 or args.seed < 0:
        raise DataValidationError(COMMAND, "--folds/--steps/--seed", f"got {args.folds}/"
                                  f"{args.steps}/{args.seed}", "pass --folds >= 2, --steps >= 1"
                                  " and --seed >= 0")  # fmt: skip
    adata = read_h5ad(args.data, "--data")
    rna_counts(adata, args.data)
    _, proteins = protein_counts(adata, _protein_key(args.overrides), args.data)
    if adata.n_obs < 5 * args.folds:
        raise DataValidationError(args.data, "cells", f"{adata.n_obs} cells for {args.folds} "
                                  "folds", "pass fewer --folds or more cells")  # fmt: skip
    return adata, proteins


def folds(n_cells: int, k: int, seed: int) -> list[np.ndarray]:
    """Held-out rows of each fold: one seeded permutation dealt into ``k`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(n_cells)
    return [np.sort(part) for part in np.array_split(order, k)]


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    adata, proteins = _cells(args)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    totalvi = _totalvi_status()
    print(f"multiomics: {adata.n_obs} cells x {adata.n_vars} genes, {len(proteins)} proteins; "
          f"{args.folds} folds, {args.steps} steps each; totalVI: {totalvi['status']}",
          flush=True)  # fmt: skip
    results = []
    for k, test in enumerate(folds(adata.n_obs, args.folds, args.seed)):
        results.append(_fold(k, adata, test, out, args))
    report = {
        "data": {"path": str(Path(args.data).resolve()), "n_cells": int(adata.n_obs),
                 "n_genes": int(adata.n_vars), "n_proteins": len(proteins),
                 "source": str(adata.uns.get("source", ""))},
        "settings": {"folds": args.folds, "seed": args.seed, "steps": args.steps,
                     "overrides": list(args.overrides), "detected": DETECTED,
                     "normalization": "log1p(count / library * 1e4) per modality; the RNA "
                     "library is the sum over the fold's modelled genes",
                     "ridge": "sklearn RidgeCV, penalty per target by leave-one-out over "
                     "10^-1..10^5"},
        "totalvi": totalvi,
        "folds": results,
        "table": _table(results),
        "per_protein": _per_protein(results, proteins),
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    from .multiomics_report import markdown, write

    write(out, report)
    print(markdown(report))
    print(f"results in {out / 'results.md'} ({report['seconds']:.0f} s)")
    return 0


def _totalvi_status() -> dict:
    if importlib.util.find_spec("scvi") is None:
        return {"status": "not installed", "note": "scvi-tools is not importable in this "
                "environment; install latentcell[bench] to compare with totalVI"}  # fmt: skip
    return {"status": "installed, not run", "note": "the totalVI comparison is not wired yet"}


def _train(k: int, train_file: Path, out: Path, args) -> Path:
    from latentcell.families import family_named
    from latentcell.families.train import load_family_config, train_family

    from .perturbation_entries import _reset_accelerate

    run = out / "runs" / f"fold{k}"
    if args.reuse and (run / "final" / "model_config.json").exists():
        return run
    tracking = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [
        "tracking.enabled=false"
    ]  # fmt: skip
    overrides = [
        f"data.path={train_file}", f"run.dir={run}", f"run.root={out}", "data.val_fraction=0",
        f"train.max_steps={args.steps}", f"train.seed={args.seed}", "train.progress=false",
        "train.checkpoint_every=0", "train.eval_every=0", *tracking, *args.overrides,
    ]  # fmt: skip
    family = family_named("multiomics")
    try:
        train_family(family, load_family_config(family, None, overrides))
    finally:
        _reset_accelerate()
    return run


def _fold(k: int, adata, test: np.ndarray, out: Path, args) -> dict:
    """Train on every cell outside ``test``, translate ``test`` both ways, score both entries."""
    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.evaluation.translation import log1p_normalized, ridge_translate
    from latentcell.inference.multiomics_translator import load_translator

    t = time.perf_counter()
    train = np.setdiff1d(np.arange(adata.n_obs), test)
    where = out / "folds" / f"fold{k}"
    train_file = write_h5ad_atomic(adata[train].copy(), where / "train.h5ad")
    run = _train(k, train_file, out, args)
    seconds = time.perf_counter() - t
    translator = load_translator(run)
    src = f"{args.data} (fold {k})"
    counts = {}
    for part, rows in (("train", train), ("test", test)):
        cells = adata[rows]
        counts[part] = {"rna": translator.rna_matrix(cells, src),
                        "protein": translator.protein_matrix(cells, src)}  # fmt: skip
    real = {m: log1p_normalized(counts["test"][m]) for m in ("rna", "protein")}
    fitted = {m: log1p_normalized(counts["train"][m]) for m in ("rna", "protein")}
    predicted = {
        "multiomics": {
            "protein": translator.normalized(counts["test"]["rna"], "rna", "protein"),
            "rna": translator.normalized(counts["test"]["protein"], "protein", "rna"),
        },
        "ridge": {
            "protein": ridge_translate(fitted["rna"], fitted["protein"], real["rna"]),
            "rna": ridge_translate(fitted["protein"], fitted["rna"], real["protein"]),
        },
    }
    detected = (counts["test"]["rna"] > 0).mean(0) >= DETECTED
    scores = {name: _scores(pred, real, detected) for name, pred in predicted.items()}
    line = ", ".join(f"{n} {s['rna_to_protein']['mean']:.3f} / {s['protein_to_rna']['mean']:.3f}"
                     for n, s in scores.items())  # fmt: skip
    print(f"fold {k}: {len(train)} train / {len(test)} held-out cells, {len(translator.genes)} "
          f"genes; r RNA->protein / protein->RNA: {line} ({time.perf_counter() - t:.0f} s)",
          flush=True)  # fmt: skip
    return {
        "fold": k, "n_train": int(len(train)), "n_test": int(len(test)),
        "n_genes": len(translator.genes), "n_detected": int(detected.sum()),
        "run_dir": str(run), "train_seconds": round(seconds, 1),
        "scores": {n: {key: s[key] for key in SCORES} for n, s in scores.items()},
        "protein_r": {n: [_num(v) for v in s["protein_r"]] for n, s in scores.items()},
    }  # fmt: skip


def _scores(pred: dict, real: dict, detected: np.ndarray) -> dict:
    from latentcell.evaluation.translation import column_pearson, summary

    protein_r = column_pearson(pred["protein"], real["protein"])
    gene_r = column_pearson(pred["rna"], real["rna"])
    return {"rna_to_protein": summary(protein_r), "protein_to_rna": summary(gene_r),
            "protein_to_rna_detected": summary(gene_r, detected),
            "protein_r": protein_r}  # fmt: skip


def _num(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)) if values else None, "sd": sd, "n": len(values)}


def _table(results: list[dict]) -> dict:
    """Per entry and score: mean ± sd over folds of the per-fold means; and the paired
    difference multiomics - ridge per fold (same cells, same genes), with the folds it wins."""
    table = {name: {key: _stats([f["scores"][name][key]["mean"] for f in results])
                    for key in SCORES} for name in ENTRIES}  # fmt: skip
    table[PAIRED] = {}
    for key in SCORES:
        pairs = [(f["scores"]["multiomics"][key]["mean"], f["scores"]["ridge"][key]["mean"])
                 for f in results]  # fmt: skip
        gaps = [a - b for a, b in pairs if a is not None and b is not None]
        table[PAIRED][key] = _stats(gaps) | {"wins": int(sum(g > 0 for g in gaps))}
    return table


def _per_protein(results: list[dict], proteins: list[str]) -> list[dict]:
    """Each protein's r averaged over the folds where it is defined, per entry."""
    rows = []
    for i, name in enumerate(proteins):
        row = {"protein": name}
        for entry in ENTRIES:
            values = [f["protein_r"][entry][i] for f in results]
            values = [v for v in values if v is not None]
            row[entry] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    from latentcell.benchmarks.cli import standalone

    sys.exit(standalone(__doc__, add_arguments, run))
