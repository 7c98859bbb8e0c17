"""Read throughput of our stores against how other tools read h5ad, on one process.

    latentcell benchmark readers --cells 200000 --genes 2000 --out bench.json

Synthesizes a VCC-schema h5ad and saves it again with anndata's own writer (contiguous,
uncompressed X: how most h5ad files in the wild are laid out, and the best case for the h5ad
readers), builds a Zarr v3 store and WebDataset shards from it, then measures cells/s for:

    anndata_backed_random   anndata backed h5ad, random batches of rows (sorted within a batch)
    h5py_csr_random         direct h5py CSR row slices per cell, as Arc's cell-load reads
    zarr_stream             CellStream over the Zarr store (shuffled chunks + buffer), CSR batches
    webdataset_stream       CellStream over the WebDataset shards, CSR batches
    set_sampler             SetSampler over the Zarr store, set_size 128; counts control AND
                            perturbed cells delivered
    numpy_in_memory_random  random batches gathered from a CSR matrix already in RAM (upper bound)

Each reader runs in a fresh process (so its peak RSS is its own) and reports the median
cells/s of three windows of ``--seconds / 3`` after a warm-up (streams run whole epochs).
With ``--workdir`` the data is kept there and reused by later runs with the same sizes. Prints a table and writes
``{"results": {name: cells_per_s}, "peak_rss_mb": {...}, "ratios": {...}, "setup": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np

from latentcell.benchmarks import reader_baselines as baselines
from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize


def windows(measure_once: Callable[[float], float], seconds: float) -> float:
    """Median cells/s over 3 windows of ``seconds / 3`` after a short warm-up: the 2-core
    machines this runs on vary by +-20% between runs, and a median resists one slow window."""
    measure_once(min(1.0, seconds / 6))
    return float(np.median([measure_once(seconds / 3) for _ in range(3)]))


def stream_cells_per_s(stream, seconds: float, per_item) -> float:
    """Whole epochs until ``seconds`` have passed; cells/s over all of them."""
    cells, start = 0, time.perf_counter()
    while True:
        stream.set_epoch(stream.epoch + 1)
        for item in stream.loader():
            cells += per_item(item)
        if time.perf_counter() - start >= seconds:
            return cells / (time.perf_counter() - start)


def real_cells(batch: dict) -> int:
    return int((~batch["is_pad"]).sum())


def pair_cells(pair: dict) -> int:
    return 0 if pair["is_pad"] else 2 * len(pair["perturbed"]["row"])


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Synthesize the h5ad and build both stores (reusing them if present), timing each step."""
    paths = {
        "h5ad": workdir / "bench.h5ad",
        "zarr": workdir / "bench.zarr",
        "webdataset": workdir / "bench.wds",
    }
    setup = {"cells": args.cells, "genes": args.genes, "batch_size": args.batch_size}
    if not paths["h5ad"].exists():
        t = time.perf_counter()
        config = SynthConfig(
            schema="vcc",
            n_cells=args.cells,
            n_genes=args.genes,
            n_perturbations=args.perturbations,
            n_cell_types=args.cell_types,
            n_batches=args.batches,
            seed=args.seed,
            compression="none",
        )
        synthesize(config, workdir / "synth.h5ad")
        setup["synth_seconds"] = round(time.perf_counter() - t, 1)
        ad.read_h5ad(workdir / "synth.h5ad").write_h5ad(paths["h5ad"])
        (workdir / "synth.h5ad").unlink()
    for fmt in ("zarr", "webdataset"):
        if not paths[fmt].exists():
            t = time.perf_counter()
            build_store([paths["h5ad"]], paths[fmt], format=fmt, schema="vcc")
            setup[f"build_{fmt}_cells_per_s"] = round(args.cells / (time.perf_counter() - t))
    backed = ad.read_h5ad(paths["h5ad"], backed="r")
    setup["density"] = round(backed.X.group["data"].shape[0] / (args.cells * args.genes), 4)
    backed.file.close()
    setup["paths"] = {k: str(v) for k, v in paths.items()}
    return setup


READERS = (
    "anndata_backed_random",
    "h5py_csr_random",
    "zarr_stream",
    "webdataset_stream",
    "set_sampler",
    "numpy_in_memory_random",
)


def run_reader(name: str, paths: dict, batch_size: int, seconds: float, seed: int) -> dict:
    """One reader in a fresh process: cells/s and that process's own peak RSS."""
    once = _reader(name, paths, batch_size, seed)
    cells_per_s = windows(once, seconds)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"cells_per_s": round(cells_per_s), "peak_rss_mb": round(peak_mb)}


def _reader(name: str, paths: dict, batch_size: int, seed: int) -> Callable[[float], float]:
    """A function of seconds -> cells/s for reader ``name``."""
    if name in ("anndata_backed_random", "h5py_csr_random"):
        return partial(getattr(baselines, name), paths["h5ad"], batch_size, seed=seed)
    if name == "numpy_in_memory_random":
        matrix = ad.read_h5ad(paths["h5ad"]).X.tocsr()
        return partial(baselines.numpy_in_memory_random, matrix, batch_size, seed=seed)
    if name == "set_sampler":
        config = SetSamplerConfig(set_size=128, seed=seed, output="csr")
        sampler = SetSampler(partial(open_store, paths["zarr"]), config)
        return partial(stream_cells_per_s, sampler, per_item=pair_cells)
    fmt = "zarr" if name == "zarr_stream" else "webdataset"
    config = CellStreamConfig(batch_size=batch_size, seed=seed, output="csr")
    stream = CellStream(partial(open_store, paths[fmt]), config)
    return partial(stream_cells_per_s, stream, per_item=real_cells)


def measure(args: argparse.Namespace, setup: dict) -> tuple[dict, dict]:
    results, peaks = {}, {}
    context = multiprocessing.get_context("spawn")
    for name in READERS:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            job = pool.submit(
                run_reader, name, setup["paths"], args.batch_size, args.seconds, args.seed
            )
            out = job.result()
        results[name], peaks[name] = out["cells_per_s"], out["peak_rss_mb"]
        print(f"  {name:<24} {results[name]:>12,} cells/s   peak RSS {peaks[name]:>6,} MB")
    return results, peaks


def ratios(results: dict) -> dict:
    return {
        "zarr_stream / anndata_backed_random": results["zarr_stream"]
        / results["anndata_backed_random"],
        "zarr_stream / numpy_in_memory_random": results["zarr_stream"]
        / results["numpy_in_memory_random"],
        "webdataset_stream / anndata_backed_random": results["webdataset_stream"]
        / results["anndata_backed_random"],
        "zarr_stream / h5py_csr_random": results["zarr_stream"] / results["h5py_csr_random"],
    }


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic data ``prepare`` builds (shared with the loader benchmark)."""
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=50)
    parser.add_argument("--cell-types", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep and reuse the data here (default: a temp folder)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum time per reader")
    parser.add_argument("--out", required=True, help="JSON file for the results")


def run(args: argparse.Namespace) -> int:

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp) / f"cells{args.cells}_genes{args.genes}"
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.cells:,} cells x {args.genes:,} genes in {workdir}")
        setup = prepare(args, workdir)
        print(json.dumps({k: v for k, v in setup.items() if k != "paths"}))
        results, peaks = measure(args, setup)
    report = {"results": results, "peak_rss_mb": peaks, "ratios": ratios(results), "setup": setup}
    for name, value in report["ratios"].items():
        print(f"  {name:<42} {value:8.2f}x")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
