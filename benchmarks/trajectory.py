"""Trajectory generation: the DiT conditioned on continuous time, at held-out times.

    latentcell benchmark trajectory --data FILE --out DIR [--time-col Pseudotime] [--bins 10]
        [--train-seeds 0] [--sampling-seeds 0,1,2] [--vae-steps N] [--dit-steps N]
        [--set vae.KEY=V] [--set dit.KEY=V] [--reuse]

1. The cells are cut into ``--bins`` equal-count bins of time. Two are held out: the middle
   one (interior: can the model fill a gap between times it saw?) and the last one (forecast:
   can it say what comes after the latest time it saw, from earlier cells only?).
2. For each training seed: the count VAE and the latent DiT of ``benchmark generation``,
   trained through the same trainer on the remaining bins, the DiT conditioned on the time
   alone (``model.continuous``, no categorical condition).
3. For each sampling seed: one DiT cell at each held-out real cell's own time, and the
   baseline a reviewer asks for, made of real training cells: for the interior bin, equal
   halves from the two neighbouring bins (interpolation by mixing); for the last bin, the last
   training bin's cells (persistence). Persistence rather than a linear extrapolation of gene
   means: it gives whole cells, so the distribution metrics apply, and it cannot overshoot.
4. ``evaluate_generation`` scores both per held-out bin against a third of that bin's real
   cells, beside the real-vs-real ceiling (another third; the last third fits the PCA):
   kNN AUC, energy distance, MMD, PRDC, per-gene mean and variance agreement.

Writes ``results.json`` and ``results.md`` into ``--out``, each number the mean ± sd over
every (training seed, sampling seed) pair.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark trajectory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="h5ad of raw counts with a time column")
    parser.add_argument("--out", required=True, help="folder for runs, results.json/.md")
    parser.add_argument("--time-col", default="Pseudotime", help="numeric obs column (time)")
    parser.add_argument("--bins", type=int, default=10, help="equal-count time bins (>= 4)")
    parser.add_argument("--train-seeds", default="0", help="comma list: one VAE + DiT per seed")
    parser.add_argument("--sampling-seeds", default="0,1,2", help="comma list")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--dit-steps", type=int, default=2000)
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
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")


def run(args: argparse.Namespace) -> int:
    """The CLI turns any failure into one line (``data_pipelines.errors.run_cli``)."""
    from latentcell.benchmarks.generation import parse_seeds
    from latentcell.benchmarks.generation_steps import train_models
    from latentcell.benchmarks.trajectory_report import write_report
    from latentcell.benchmarks.trajectory_steps import (
        dit_overrides,
        evaluate_seed,
        load_time_cells,
        split_bins,
    )

    t0 = time.perf_counter()
    train_seeds = parse_seeds(args.train_seeds, "--train-seeds")  # flags first: before any work
    sampling_seeds = parse_seeds(args.sampling_seeds, "--sampling-seeds")
    if args.bins < 4:
        raise DataValidationError(COMMAND, "--bins", f"got {args.bins}", "pass --bins >= 4")
    bins = load_time_cells(args.data, args.time_col, args.bins)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    split = split_bins(bins, out)
    train_args = argparse.Namespace(**{
        **vars(args), "overrides": [*args.overrides, *dit_overrides(args.time_col)]
    })  # fmt: skip
    runs, timings = [], {}
    for train_seed in train_seeds:
        t = time.perf_counter()
        trained = train_models(train_args, split, out / f"train_seed{train_seed}", train_seed)
        timings[f"train_seed{train_seed}_s"] = time.perf_counter() - t
        for seed in sampling_seeds:
            t = time.perf_counter()
            result = evaluate_seed(args, bins, split, trained, seed)
            runs.append({"train_seed": train_seed, **result})
            timings[f"evaluate_train{train_seed}_sample{seed}_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    write_report(args, out, bins, split, runs, timings)
    return 0
