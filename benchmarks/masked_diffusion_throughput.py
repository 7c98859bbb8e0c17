"""Masked-diffusion training and sampling throughput on this machine, beside ST.

    latentcell benchmark masked-diffusion-throughput [--genes 299,2000] [--patch-sizes 1,4,16]
        [--hidden 128] [--depth 4] [--heads 4] [--set-size 32] [--sets 4]
        [--sample-steps 1,4,16,64] [--sample-patch-sizes 16] [--repeats 2] [--threads 2] [--out DIR]

Training: one step = forward, backward and an AdamW step (``trainer.optim.build_optimizer``)
on a batch of ``sets`` random (control set, perturbed set) pairs of ``set_size`` cells, for
ST (``cross`` conditioning: a control encoder + self/cross blocks, the closest ST form) and
the masked-diffusion model at each ``patch_size``, at the same hidden width, depth, heads
and control depth (depth // 2). Cells/s counts generated (perturbed) cells. ``--repeats``
alternates the contenders, so drifting load hits all; the median window is reported and the
ratio to ST is printed. This measurement chose the default tokenization (README).

Sampling: whole-cell generation with the torch predictor's sampler
(``inference/masked_diffusion_sampling.py``: the control set encoded once, then ``steps``
denoiser calls with confidence-ordered unmasking, bins decoded), cells/s against steps, on
an untrained model (the cost does not depend on the weights). A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from latentcell.inference.masked_diffusion_predictor import ModelSampler, model_settings
from latentcell.models.masked_diffusion import MaskedDiffusion, MaskedDiffusionConfig
from latentcell.models.st_model import STConfig, STModel
from latentcell.trainer.optim import build_optimizer
from latentcell.trainer.sections import OptimConfig

N_LABELS = 26  # Papalexi's vocabulary size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--genes", default="299,2000", help="comma list of gene counts")
    p.add_argument("--patch-sizes", default="1,4,16", help="masked-diffusion genes per token")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--set-size", type=int, default=32)
    p.add_argument("--sets", type=int, default=4, help="sets per training step")
    p.add_argument("--sample-steps", default="1,4,16,64", help="sampler steps to time")
    p.add_argument("--sample-patch-sizes", default="16", help="tokenizations to sample with")
    p.add_argument("--sample-cells", type=int, default=256, help="cells generated per timing")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternations of the contenders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write results.json here")


def _expression(sets: int, size: int, genes: int, gen: torch.Generator) -> torch.Tensor:
    rates = torch.rand(sets, size, genes, generator=gen)
    return torch.log1p(torch.poisson(rates, generator=gen))


def _labels() -> tuple[str, ...]:
    return ("non-targeting",) + tuple(f"G{i}" for i in range(1, N_LABELS))


def _masked_diffusion(args, genes: int, patch: int) -> MaskedDiffusion:
    config = MaskedDiffusionConfig(
        n_genes=genes, perturbation_labels=_labels(), patch_size=patch, hidden=args.hidden,
        depth=args.depth, heads=args.heads, control_depth=max(1, args.depth // 2),
    )  # fmt: skip
    model = MaskedDiffusion(config)
    edges = np.quantile(np.log1p(np.arange(1, 50)), np.linspace(0, 1, config.n_bins))
    model.set_statistics(edges, np.ones(genes), np.ones(N_LABELS))
    return model


def _st(args, genes: int) -> STModel:
    config = STConfig(
        n_features=genes, perturbation_labels=_labels(), conditioning="cross",
        hidden=args.hidden, depth=args.depth, heads=args.heads,
    )  # fmt: skip
    return STModel(config)


def _batch(args, genes: int, gen: torch.Generator) -> dict:
    return {
        "control": {"features": _expression(args.sets, args.set_size, genes, gen)},
        "perturbed": {"features": _expression(args.sets, args.set_size, genes, gen)},
        "is_pad": torch.zeros(args.sets, dtype=torch.bool),
        "perturbation": torch.randint(1, N_LABELS, (args.sets,), generator=gen),
        "cell_type": torch.zeros(args.sets, dtype=torch.long),
    }


def _train_windows(model, batch, args) -> list[float]:
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))

    def step():
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    out = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        out.append((time.perf_counter() - start) / args.steps)
    return out


def _sampling_rate(model, steps: int, args, control: np.ndarray) -> float:
    genes = [f"g{i}" for i in range(model.config.n_genes)]
    settings = model_settings(model, args.set_size, "non-targeting")
    sampler = ModelSampler(model, settings, genes, "benchmark", steps=steps)
    start = time.perf_counter()
    sampler.predict(control, "G1", "any", rng=np.random.default_rng(0))
    return len(control) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    gene_counts = [int(g) for g in args.genes.split(",")]
    patches = [int(p) for p in args.patch_sizes.split(",")]
    steps_list = [int(s) for s in args.sample_steps.split(",")]
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}
    results = {"args": settings, "load_before": os.getloadavg()[0], "training": [],
               "sampling": []}  # fmt: skip
    for genes in gene_counts:
        gen = torch.Generator().manual_seed(0)
        batch = _batch(args, genes, gen)
        contenders = {"st-cross": lambda g=genes: _st(args, g)}
        for p in patches:
            contenders[f"masked-diffusion-p{p}"] = lambda g=genes, p=p: _masked_diffusion(
                args, g, p
            )
        windows: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, build in contenders.items():
                torch.manual_seed(0)
                windows[name] += _train_windows(build(), batch, args)
        st_rate = args.sets * args.set_size / statistics.median(windows["st-cross"])
        for name, w in windows.items():
            rate = args.sets * args.set_size / statistics.median(w)
            row = {"genes": genes, "model": name, "cells_per_s": round(rate, 1),
                   "ratio_to_st": round(rate / st_rate, 3)}  # fmt: skip
            results["training"].append(row)
            print(f"train  genes={genes:5d} {name:24s} {rate:9.1f} cells/s  "
                  f"{rate / st_rate:6.3f}x ST")  # fmt: skip
        for p in (int(x) for x in args.sample_patch_sizes.split(",")):
            model = _masked_diffusion(args, genes, p)
            control = _expression(1, args.sample_cells, genes, gen)[0].numpy()
            for steps in steps_list:
                rate = _sampling_rate(model, steps, args, control)
                results["sampling"].append({"genes": genes, "patch_size": p, "steps": steps,
                                            "cells_per_s": round(rate, 1)})  # fmt: skip
                print(f"sample genes={genes:5d} patch={p:3d} steps={steps:4d} "
                      f"{rate:9.1f} cells/s")  # fmt: skip
    results["load_after"] = os.getloadavg()[0]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
