"""Throughput of latent diffusion on this machine: DiT training steps and whole generation.

    latentcell benchmark dit-throughput [--run DIT_RUN] [--threads 2] [--repeats 3]

Generation is the full path ``latentcell generate`` takes: 50-step DDIM with classifier-free
guidance (conditional and unconditional rows in one batched forward) -> VAE decoder -> NB
counts, at batch 1 and 1024; reported as cells/s and ms per batch (median of repeats).
Training is optimizer steps of the DiT on latents (forward, backward, AdamW) at batch 512 for
several token layouts, as cells/s. Without ``--run`` the models are freshly initialized at
the demo's sizes (throughput does not depend on the weights). Prints one JSON line per
measurement; nothing here is asserted, it is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from latentcell.models.count_vae import CountVAE, CountVAEConfig
from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh_models(n_latent: int, n_genes: int, dit: DiTConfig, diffusion: DiffusionConfig):
    model = LatentDiffusion(
        LatentDiffusionConfig(dit=dit, diffusion=diffusion, categorical_keys=("cell_type",))
    ).eval()
    vae = CountVAE(CountVAEConfig(n_genes=n_genes, n_latent=n_latent, n_hidden=128)).eval()
    return model, vae


def generation(model: LatentDiffusion, vae: CountVAE, batch: int, steps: int, guidance: float,
               repeats: int, decode: bool = True) -> dict:  # fmt: skip
    codes = torch.zeros((batch, len(model.config.categorical_keys)), dtype=torch.long)
    values = torch.zeros((batch, model.config.dit.n_continuous))
    library = torch.full((batch,), 2000.0)
    g = torch.Generator().manual_seed(0)

    def run():
        with torch.no_grad():
            z = model.sample(codes, values, steps=steps, guidance=guidance, generator=g)
            if decode:
                vae.sample(z, library, generator=g)

    seconds = _median_seconds(run, repeats)
    return {"batch": batch, "steps": steps, "guidance": guidance, "decode": decode,
            "ms_per_batch": 1000 * seconds, "cells_per_s": batch / seconds}  # fmt: skip


def training(dit: DiTConfig, diffusion: DiffusionConfig, batch: int, repeats: int) -> dict:
    model = LatentDiffusion(
        LatentDiffusionConfig(dit=dit, diffusion=diffusion, categorical_keys=("cell_type",))
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = {"X": torch.randn(batch, dit.n_latent), "obs": {"cell_type": torch.zeros(batch).long()}}

    def steps(k: int = 5):
        for _ in range(k):
            loss = model(data).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = _median_seconds(steps, repeats) / 5
    params = sum(p.numel() for p in model.parameters())
    return {"n_latent": dit.n_latent, "patch_size": dit.patch_size, "tokens": dit.n_tokens,
            "hidden": dit.hidden, "depth": dit.depth, "params": params, "batch": batch,
            "ms_per_step": 1000 * seconds, "cells_per_s": batch / seconds}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a finished DiT run (else fresh models at demo sizes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": "cpu"}  # fmt: skip
    print(json.dumps({"environment": env}))

    if args.run:
        from latentcell.inference.generate import CellGenerator

        generator = CellGenerator.load(args.run)
        model, vae = generator.dit, generator.vae
        source = args.run
    else:
        dit = DiTConfig(n_latent=10, patch_size=5, hidden=96, depth=2, heads=4, n_categories=(2,))
        model, vae = fresh_models(10, 1000, dit, DiffusionConfig())
        source = "fresh demo-sized models (10 latent dims, 2 tokens, hidden 96, depth 2)"
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"generation_model": source, "dit_params": n_params,
                      "n_genes": vae.config.n_genes}))  # fmt: skip
    for batch in (1, 1024):
        for decode in (False, True):
            row = generation(model, vae, batch, args.steps, args.guidance, args.repeats, decode)
            print(json.dumps({"generation": row}))

    for n_latent, patch, hidden, depth in ((10, 5, 96, 2), (10, 2, 128, 4), (10, 1, 128, 4),
                                           (16, 4, 128, 3)):  # fmt: skip
        config = DiTConfig(n_latent=n_latent, patch_size=patch, hidden=hidden, depth=depth,
                           heads=4, n_categories=(7,))  # fmt: skip
        print(json.dumps({"training": training(config, DiffusionConfig(), 512, args.repeats)}))
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
