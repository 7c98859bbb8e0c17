"""``latentcell generate``: cells from a trained latent-diffusion run, written as h5ad.

    latentcell generate --run DIR --n N --condition cell_type=LABEL [--condition k=v ...]
                        [--steps K --guidance S --seed 0,1,2] [--library latent|condition]
                        [--baseline vae-prior] --out GEN.h5ad

``--condition k=*`` generates N cells for every label of k. ``--seed`` takes a comma list
(default three seeds): N cells per combination for each, ``obs['sampling_seed']`` saying
which, so ``latentcell evaluate generation`` can report the spread over seeds.
"""

from __future__ import annotations

import argparse
import time

from latentcell.data_pipelines.errors import DataValidationError

DEFAULT_SEEDS = "0,1,2"


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate cells from a trained DiT run (h5ad)")
    p.add_argument("--run", required=True, help="run.dir of `latentcell train dit`")
    p.add_argument("--n", type=int, required=True, help="cells per condition combination")
    p.add_argument(
        "--condition", action="append", default=[], metavar="KEY=VALUE",
        help="a condition (obs column or role name); VALUE * means every label; repeatable",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's)")
    p.add_argument(
        "--seed", default=DEFAULT_SEEDS, metavar="S[,S...]",
        help="sampling seeds, comma-separated: --n cells per combination for each "
        f"(obs['sampling_seed']); default {DEFAULT_SEEDS}",
    )  # fmt: skip
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "model"))
    p.add_argument(
        "--library", default="latent", choices=("latent", "condition"),
        help="library sizes: the per-condition log-normal with its mean linear in each cell's "
        "latent (default), or the plain per-condition log-normal",
    )  # fmt: skip
    p.add_argument(
        "--baseline", default=None, choices=("vae-prior",),
        help="decode z ~ N(0, I) instead of DiT samples (the VAE-only baseline)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")
    p.set_defaults(func=run_generate)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else than distinct non-negative integers is an
    input error (before any model is loaded)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DataValidationError(
            "<options>", "--seed", f"expected distinct non-negative integers, got {text!r}",
            "pass e.g. --seed 0 or --seed 0,1,2",
        )  # fmt: skip
    return seeds


def run_generate(args: argparse.Namespace) -> int:
    from latentcell.inference.generate import CellGenerator, write_h5ad_atomic
    from latentcell.launch.next_steps import after_generate, finish
    from latentcell.models.conditions import parse_conditions

    start = time.perf_counter()
    seeds = parse_seeds(args.seed)
    generator = CellGenerator.load(args.run, args.weights, args.library)
    adata = generator.generate_seeds(
        args.n,
        parse_conditions(args.condition),
        seeds,
        steps=args.steps,
        guidance=args.guidance,
        source="vae_prior" if args.baseline == "vae-prior" else "dit",
    )
    out = write_h5ad_atomic(adata, args.out)
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "n_cells": adata.n_obs, "n_genes": adata.n_vars,
               "seeds": seeds, "seconds": round(seconds, 2)}  # fmt: skip
    finish(summary, after_generate(summary), args.json)
    return 0
