"""``latentcell generate``: cells from a trained latent-diffusion run, written as h5ad.

    latentcell generate --run DIR --n N --condition cell_type=LABEL [--condition k=v ...]
                        [--steps K --guidance S --seed S] [--library latent|condition]
                        [--baseline vae-prior] --out GEN.h5ad

``--condition k=*`` generates N cells for every label of k.
"""

from __future__ import annotations

import argparse
import json
import time

from latentcell.models.conditions import parse_conditions


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
    p.add_argument("--seed", type=int, default=0)
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
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from latentcell.trainer.generate import CellGenerator, write_h5ad_atomic

    start = time.perf_counter()
    generator = CellGenerator.load(args.run, args.weights, args.library)
    adata = generator.generate(
        args.n,
        parse_conditions(args.condition),
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        source="vae_prior" if args.baseline == "vae-prior" else "dit",
    )
    out = write_h5ad_atomic(adata, args.out)
    seconds = time.perf_counter() - start
    print(json.dumps({"out": str(out), "n_cells": adata.n_obs, "n_genes": adata.n_vars,
                      "seconds": round(seconds, 2)}))  # fmt: skip
    return 0
