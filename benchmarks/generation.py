"""Conditional generation on held-out cells of any h5ad, beside the baselines and the ceiling.

    latentcell benchmark generation --data FILE --condition-col COL[,COL...] --out DIR
        [--classifier-col COL] [--train-seeds 0,1] [--sampling-seeds 0,1,2]
        [--vae-steps N] [--dit-steps N] [--set vae.KEY=V] [--set dit.KEY=V] [--reuse]

1. A stratified share of every condition group (the combination of the condition columns)
   is held out (``--heldout-fraction``; a group keeps at least one training cell).
2. For each training seed: a count VAE and a latent DiT, conditioned on the condition
   columns, trained through the same trainer and with the same defaults as ``latentcell train
   vae`` / ``train dit`` (only the step budgets, the run folders and ``--set`` overrides
   differ), validating on the trainer's own split of the training cells.
3. For each sampling seed: the DiT's cells and the VAE prior's cells for every held-out
   group, judged by ``evaluate_generation`` against the held-out cells, with the training
   cells fitting the PCA, the per-group Gaussian in PCA space and the real-vs-real ceiling;
   and the latent memorization check (``latent_nn_ratio`` against the DiT's training latents,
   beside the same ratio for validation cells the VAE never trained on).
4. Every number is averaged over all (training seed, sampling seed) pairs (mean ± sd, and the
   per-training-seed means); the verdict compares the DiT with the Gaussian in PCA (kNN AUC at
   least ``TARGET_MARGIN`` below it, energy distance below it).

Writes ``results.json``, ``results.md``, ``figures/`` into ``--out`` and logs the summary and
figures to the first DiT's MLflow run (SQLite store under ``--out``). Without ``--data`` it
synthesizes cells with several cell types and perturbations (``data synth``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark generation"

REPORTED = (
    "knn_auc", "energy_distance", "mmd", "precision", "recall", "density", "coverage",
    "mean_r2", "var_r2", "zero_frac_mae", "distance_to_training_ratio",
)  # fmt: skip
METHODS = ("generated", "vae_prior", "gaussian_pca", "real_ceiling")
TARGET_MARGIN = 0.03  # the DiT's kNN AUC must be this far below the Gaussian's
MAX_CELLS_PER_GROUP = 2000
MIN_CELLS_PER_GROUP = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for runs, results.json/.md, figures")
    parser.add_argument("--data", help="h5ad of raw counts; default: synthetic cells")
    parser.add_argument(
        "--condition-col",
        help="obs column(s) the DiT is conditioned on; groups are their combinations "
        "(default: cell_type,target_gene on the synthetic data)",
    )
    parser.add_argument(
        "--classifier-col", help="obs column the classifier predicts (default: the conditions)"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.3)
    parser.add_argument("--train-seeds", default="0", help="comma list: one VAE + DiT per seed")
    parser.add_argument("--sampling-seeds", default="0,1,2", help="comma list (>= 3 advised)")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--dit-steps", type=int, default=8000)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a config key of one stage: vae.model.n_latent=16, dit.model.depth=4",
    )
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the DiT run's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the DiT run's)")
    parser.add_argument("--synthetic-cells", type=int, default=6000)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")


def run(args: argparse.Namespace) -> int:
    """The CLI turns any failure into one line (``data_pipelines.errors.run_cli``)."""
    from latentcell.benchmarks.generation_report import write_report
    from latentcell.benchmarks.generation_steps import (
        evaluate_seed,
        load_cells,
        split_held_out,
        train_models,
    )

    t0 = time.perf_counter()
    train_seeds = parse_seeds(args.train_seeds, "--train-seeds")  # flags first: before any work
    sampling_seeds = parse_seeds(args.sampling_seeds, "--sampling-seeds")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise DataValidationError(
            COMMAND, "--heldout-fraction", f"got {args.heldout_fraction}", "pass a value in (0, 1)"
        )
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cells = load_cells(args, out)
    split = split_held_out(cells, args.heldout_fraction, out)
    runs, timings = [], {}
    for train_seed in train_seeds:
        t = time.perf_counter()
        trained = train_models(args, split, out / f"train_seed{train_seed}", train_seed)
        timings[f"train_seed{train_seed}_s"] = time.perf_counter() - t
        for seed in sampling_seeds:
            t = time.perf_counter()
            runs.append(evaluate_seed(args, split, trained, train_seed, seed))
            timings[f"evaluate_train{train_seed}_sample{seed}_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    write_report(args, out, split, runs, timings)
    return 0


def parse_seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise DataValidationError(COMMAND, flag, f"got {text!r}", "pass comma-separated ints >= 0")
    return seeds
