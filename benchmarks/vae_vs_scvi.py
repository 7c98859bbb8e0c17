"""Count VAE benchmark: latentcell's CountVAE against scvi-tools' SCVI, side by side in one run.

    latentcell benchmark vae-scvi [--data synth|PATH.h5ad] [--cells 20000]
        [--genes 2000] [--steps 600] [--repeats 3] [--threads 2] [--out bench.json]

Both tools train on the same 90% of the cells (fixed permutation) for the same number of
optimizer steps with matched sizes and optimisation (``ReferenceSizes``: 128 hidden, 10 latent,
1 layer, NB with per-gene dispersion, dropout 0.1, batch 256, Adam lr 1e-3 eps 1e-8 without
weight decay, schedule or clipping, linear KL warm-up over a third of the steps, no batch
covariate); both are scored on the other 10%: reconstruction log-likelihood, ELBO and the
100-sample importance-sampled marginal log-likelihood, per cell in nats. Ours trains through
the real trainer (``fit``) from Zarr stores built by ``build_store``; scvi from the same cells
in memory. The tools alternate within each repeat so drifting machine load hits both.
A script, not a test: timings depend on the machine. Needs scvi-tools (``.venv-bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from latentcell.data_pipelines.batches import BatchSpec, make_batch
from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize
from latentcell.trainer.loop import fit
from latentcell.trainer.sections import DataConfig, OptimConfig, RunSection, TrainConfig
from latentcell.trainer.tracking import TrackingConfig
from latentcell.trainer.vae_stage import VAEModelSection, VAERunConfig, VAEStage

from .scvi_reference import ReferenceSizes, scvi_heldout_metrics, train_scvi

INSTALL_HINT = (
    "scvi-tools is needed for this benchmark and is not installed here. Install it with "
    "`pip install 'latentcell[bench]'` (or run it with a bench environment's python)."
)
METRICS = ("reconstruction_ll", "elbo", "marginal_ll")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synth", help="'synth' or an h5ad of raw counts")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--schema", default=None, help="build schema (default: vcc / auto)")
    p.add_argument("--cells", type=int, default=20_000, help="synthetic cells")
    p.add_argument("--genes", type=int, default=2000, help="synthetic genes")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps for both tools")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads for both tools")
    p.add_argument("--heldout-mc", type=int, default=3, help="z draws for recon/ELBO")
    p.add_argument("--marginal-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="bench_vae_work")
    p.add_argument("--out", default="bench.json")


def scvi_version() -> str:
    """Fail early, before any data work, when scvi-tools is missing."""
    try:
        import scvi
    except ImportError as err:
        raise SystemExit(f"{INSTALL_HINT}\n({err})") from err
    return scvi.__version__


def source_h5ad(args, workdir: Path) -> Path:
    """The input counts: the given h5ad, or synthetic data generated once per config."""
    if args.data != "synth":
        return Path(args.data)
    path = workdir / f"synth_{args.cells}x{args.genes}_s{args.seed}.h5ad"
    if not path.exists():
        synthesize(SynthConfig(n_cells=args.cells, n_genes=args.genes, seed=args.seed), path)
    return path


def split_h5ad(path: Path, layer: str | None, seed: int, workdir: Path) -> tuple[Path, Path]:
    """90/10 split by a fixed permutation, written as two h5ad files of raw CSR counts in X:
    the one copy of the cells that both tools read."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    X = adata.layers[layer] if layer else adata.X
    adata = ad.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=adata.obs, var=adata.var)
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    n_test = max(1, adata.n_obs // 10)
    paths = workdir / "train.h5ad", workdir / "test.h5ad"
    for out, rows in zip(paths, (np.sort(order[n_test:]), np.sort(order[:n_test])), strict=True):
        adata[rows].copy().write_h5ad(out)
    return paths


def checked_store(h5ad: Path, schema: str, out: Path) -> Path:
    """``build_store`` without HVG selection, then proof that the store holds exactly the
    h5ad's cells and genes (it may reorder both; it must not drop or change any)."""
    import anndata as ad

    build_store([h5ad], out, schema=schema, overwrite=True)
    adata = ad.read_h5ad(h5ad)
    reader = open_store(out)
    block = reader.read_rows(0, reader.meta.n_cells)
    src = np.asarray(block.numeric["_source_row"], dtype=np.int64)
    lib = np.asarray(adata.X.sum(axis=1)).ravel()
    problems = []
    if (reader.meta.n_cells, reader.meta.n_genes) != adata.shape:
        problems.append(f"shape {(reader.meta.n_cells, reader.meta.n_genes)} != {adata.shape}")
    elif not np.array_equal(np.sort(src), np.arange(adata.n_obs)):
        problems.append("cells dropped or duplicated")
    elif not np.allclose(block.library_size, lib[src], rtol=1e-6):
        problems.append("per-cell totals differ")
    elif block.X.count_nonzero() != adata.X.count_nonzero():
        problems.append("non-zero counts differ")
    if problems:
        raise SystemExit(f"store {out} does not match {h5ad}: {'; '.join(problems)}")
    return out


def sizes_for(args) -> ReferenceSizes:
    """The settings both tools share (``ReferenceSizes`` defaults = CountVAEConfig's)."""
    return ReferenceSizes(
        weight_decay=0.0,
        kl_warmup_steps=args.steps // 3,
        optimizer="Adam",
        optimizer_eps=1e-8,
    )


def our_config(s: ReferenceSizes, args, train: Path, test: Path, run_dir: Path, seed: int):
    """The run config matching ``s``: no schedule, clipping, batch covariate or tracking."""
    return VAERunConfig(
        run=RunSection(dir=str(run_dir)),
        data=DataConfig(path=str(train), val_path=str(test), batch_size=s.batch_size),
        model=VAEModelSection(
            n_latent=s.n_latent,
            n_hidden=s.n_hidden,
            n_layers=s.n_layers,
            likelihood="nb",
            dropout=s.dropout,
            batch_conditioning=False,
            kl_warmup_steps=s.kl_warmup_steps,
        ),
        optim=OptimConfig(
            lr=s.lr,
            weight_decay=s.weight_decay,
            eps=s.optimizer_eps,
            warmup_steps=0,
            schedule="constant",
            grad_clip=0.0,
        ),
        train=TrainConfig(
            max_steps=args.steps,
            seed=seed,
            mixed_precision="no",
            eval_every=0,
            checkpoint_every=0,
            progress=False,
        ),
        tracking=TrackingConfig(enabled=False, log_model=False),
    )


def steady_cells_per_s(metrics_jsonl: Path) -> float:
    """Throughput over the logged windows after the first (start-up and first batches out):
    windows hold equal step counts, so the harmonic mean of their rates."""
    rates = [
        r["train/cells_per_s"]
        for r in map(json.loads, metrics_jsonl.read_text().splitlines())
        if "train/cells_per_s" in r
    ][1:]
    return statistics.harmonic_mean(rates) if rates else float("nan")


def our_heldout(model, store: Path, args, seed: int, batch_size: int = 256) -> dict:
    """Per-cell means on the test store, in the units ``scvi_heldout_metrics`` reports."""
    reader = open_store(store)
    spec = BatchSpec(n_genes=reader.meta.n_genes, output="csr")
    g_elbo, g_mll = (torch.Generator().manual_seed(seed + i) for i in (0, 1))
    elbo, kl, mll = [], [], []
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, reader.meta.n_cells, batch_size):
            batch = make_batch(reader.read_rows(a, min(a + batch_size, reader.meta.n_cells)), spec)
            elbo.append(model.elbo_per_cell(batch, g_elbo, n_samples=args.heldout_mc))
            mean, log_var = model.encode(batch["X"], batch["library_size"])
            kl.append(0.5 * (log_var.exp() + mean**2 - 1.0 - log_var).sum(-1))
            mll.append(model.marginal_log_likelihood(batch, args.marginal_samples, g_mll))
    elbo, kl, mll = (torch.cat(v).double().mean().item() for v in (elbo, kl, mll))
    return {
        "reconstruction_ll": elbo + kl,  # E_q log p(x|z) = ELBO + KL (analytic, as scvi's)
        "elbo": elbo,
        "kl": kl,
        "marginal_ll": mll,
        "n_cells": reader.meta.n_cells,
        "seconds": time.perf_counter() - t0,
    }


def run_ours(sizes, args, stores, workdir: Path, seed: int) -> dict:
    """One training run through the real trainer, timed, then scored on the test store."""
    run_dir = workdir / "runs" / f"ours_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = our_config(sizes, args, *stores, run_dir, seed)
    t0 = time.perf_counter()
    result = fit(VAEStage(config), config)
    fit_seconds = time.perf_counter() - t0
    return {
        "cells_per_s": result.cells_per_s,
        "cells_per_s_steady": steady_cells_per_s(run_dir / "metrics.jsonl"),
        "fit_seconds": fit_seconds,
        "steps": result.step,
        "heldout": our_heldout(result.model, stores[1], args, seed),
    }


def run_scvi(sizes, args, h5ads, seed: int) -> dict:
    """One SCVI run on fresh copies of the same cells, timed, then scored on the test cells."""
    import anndata as ad

    out = train_scvi(ad.read_h5ad(h5ads[0]), sizes, args.steps, seed)
    model = out.pop("model")
    heldout = scvi_heldout_metrics(
        model,
        ad.read_h5ad(h5ads[1]),
        args.heldout_mc,
        seed,
        marginal_ll_samples=args.marginal_samples,
    )
    return {**out, "fit_seconds": out["seconds"], "heldout": heldout}


def timed(fn, *a) -> dict:
    """``fn(*a)`` with the load average before and after, to judge the timings."""
    before = os.getloadavg()
    out = fn(*a)
    return {**out, "load_before": before, "load_after": os.getloadavg()}


def machine_info(args, scvi_ver: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": args.threads,
        "torch": torch.__version__,
        "scvi": scvi_ver,
        "python": platform.python_version(),
    }


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats, ratios ours/scvi and relative held-out differences."""

    def med(tool, key, sub=None):
        return statistics.median(r[tool][sub][key] if sub else r[tool][key] for r in runs)

    out = {
        f"{t}_{k}": med(t, k)
        for t in ("ours", "scvi")
        for k in ("cells_per_s", "cells_per_s_steady")
    }
    out["ratio"] = out["ours_cells_per_s"] / out["scvi_cells_per_s"]
    out["ratio_steady"] = out["ours_cells_per_s_steady"] / out["scvi_cells_per_s_steady"]
    for k in METRICS:
        ours, ref = med("ours", k, "heldout"), med("scvi", k, "heldout")
        out.update({f"ours_{k}": ours, f"scvi_{k}": ref, f"rel_{k}": (ours - ref) / abs(ref)})
    return out


def print_table(s: dict) -> None:
    print(f"{'median over repeats':<26}{'ours':>12}{'scvi':>12}{'ours/scvi | rel':>18}")
    for label, key, ratio in (
        ("cells/s (train loop)", "cells_per_s", "ratio"),
        ("cells/s (steady)", "cells_per_s_steady", "ratio_steady"),
    ):
        print(f"{label:<26}{s['ours_' + key]:>12,.0f}{s['scvi_' + key]:>12,.0f}{s[ratio]:>17.2f}x")
    for k in METRICS:
        print(
            f"{'held-out ' + k:<26}{s['ours_' + k]:>12.2f}{s['scvi_' + k]:>12.2f}{s['rel_' + k]:>17.2%}"
        )


def run(args: argparse.Namespace) -> int:
    scvi_ver = scvi_version()
    torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + args.threads > cores:
        print(f"note: load {load:.1f} on {cores} cores; busy cores slow threaded torch most")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    schema = args.schema or ("vcc" if args.data == "synth" else "auto")
    h5ads = split_h5ad(source_h5ad(args, workdir), args.layer, args.seed, workdir)
    stores = tuple(checked_store(h, schema, workdir / f"{h.stem}.zarr") for h in h5ads)
    sizes = sizes_for(args)
    runs = []
    for r in range(args.repeats):
        seed = args.seed + r
        ours = timed(run_ours, sizes, args, stores, workdir, seed)
        ref = timed(run_scvi, sizes, args, h5ads, seed)
        runs.append({"seed": seed, "ours": ours, "scvi": ref})
        print(
            f"repeat {r}: ours {ours['cells_per_s']:,.0f} cells/s, scvi {ref['cells_per_s']:,.0f}",
            flush=True,
        )
    summary = summarize(runs)
    print_table(summary)
    meta = open_store(stores[0]).meta
    report = {
        "args": vars(args),
        "data": {
            "train_cells": meta.n_cells,
            "test_cells": open_store(stores[1]).meta.n_cells,
            "genes": meta.n_genes,
            "schema": schema,
        },
        "sizes": dataclasses.asdict(sizes),
        "machine": machine_info(args, scvi_ver),
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
