"""Benchmark: torch eager against the onnxruntime runtime, on the same trained runs.

    latentcell benchmark onnx-runtime --dit-run runs/demo/dit --st-run runs/demo/st \
        [--threads 1 2] [--repeats 7] [--steps 50] [--out bench.json]

Generation: the whole pipeline after the conditions are resolved, i.e. ``steps`` DDIM (or
flow) steps with classifier-free guidance (two passes batched per step), the library-size
draw and the decoder with the count sampling, at batch 1 and 256: torch ``CellGenerator``
(``sample_latents`` + ``decode``) against ``OnnxGenerator`` (``sample_latents`` +
``decode``). Prediction: one perturbation for a population of control cells (one set, and
eight sets): ``STPredictor.predict`` against ``OnnxSetPredictor.predict``. Torch and
onnxruntime run on the same number of intra-op threads, alternately, ``repeats`` pairs after
one warm-up call each; the speedup is the median of the per-pair ratios (robust to a shared
VM's slow spells, which reached 1.5x on this project's machine). Prints one JSON line per
measurement and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _paired(run_torch, run_ort, repeats: int) -> dict:
    """Median seconds of each, and the median of the per-pair ratios: the two run
    alternately, so a slow spell of a shared VM slows both sides of a pair alike."""
    run_torch(), run_ort()  # warm-up: first-call allocations, ORT's arena, torch's kernels
    pairs = [(_timed(run_torch), _timed(run_ort)) for _ in range(repeats)]
    t_torch, t_ort = (np.asarray(x) for x in zip(*pairs, strict=True))
    return {"torch_s": float(np.median(t_torch)), "ort_s": float(np.median(t_ort)),
            "speedup": float(np.median(t_torch / t_ort))}  # fmt: skip


def _export(run: str, out: Path) -> Path:
    from latentcell.export.exporters import export_run

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        export_run(run, out, overwrite=True)
    return out


def bench_generation(
    run: str, bundle: Path, threads: int, steps: int, repeats: int, guidance: float | None = None
) -> list:
    from latentcell.export.runtime import Bundle, OnnxGenerator
    from latentcell.inference.generate import CellGenerator

    torch.set_num_threads(threads)
    eager = CellGenerator.load(run)
    ort = OnnxGenerator(Bundle.load(bundle, threads=threads))
    column = next(iter(eager.space.categories), None)
    conditions = {column: eager.space.categories[column][0]} if column else {}
    guidance = eager.dit.config.diffusion.guidance if guidance is None else guidance
    results = []
    for batch in (1, 256):
        rows = eager.condition_rows(batch, conditions)

        def run_torch(rows=rows):
            z = eager.sample_latents(rows, steps, guidance, seed=0)
            return eager.decode(z, rows, seed=0)

        def run_ort(rows=rows):
            rng = np.random.default_rng(0)
            z = ort.sample_latents(rows, steps, guidance, rng=rng)
            return ort.decode(z, rows, rng)

        results.append({"task": "generate", "batch": batch, "steps": steps, "guidance": guidance,
                        "threads": threads, **_paired(run_torch, run_ort, repeats)})  # fmt: skip
    return results


def bench_prediction(run: str, bundle: Path, threads: int, repeats: int) -> list:
    from latentcell.export.runtime import Bundle, OnnxSetPredictor
    from latentcell.inference.st_predictor import STPredictor

    torch.set_num_threads(threads)
    eager = STPredictor(run)
    ort = OnnxSetPredictor(Bundle.load(bundle, threads=threads))
    label = next(x for x in eager.labels if x != eager.card["control_label"])
    cell_type = eager.cell_types[0] if eager.cell_types else ""
    rng = np.random.default_rng(0)
    results = []
    for n_sets in (1, 8):
        n = n_sets * eager.set_size
        x = np.log1p(rng.poisson(1.0, (n, len(eager.genes)))).astype(np.float32)
        timing = _paired(lambda x=x: eager.predict(x, label, cell_type),
                         lambda x=x: ort.predict(x, label, cell_type), repeats)  # fmt: skip
        results.append({"task": "predict", "cells": n, "sets": n_sets, "threads": threads,
                        **timing})  # fmt: skip
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dit-run", default="runs/demo/dit")
    p.add_argument("--st-run", default="runs/demo/st")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[None],
                   help="CFG scales to time (default: the run's own; 1 runs one pass)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dit_bundle = _export(args.dit_run, Path(tmp) / "dit") if args.dit_run else None
        st_bundle = _export(args.st_run, Path(tmp) / "st") if args.st_run else None
        for threads in args.threads:
            for guidance in args.guidance if dit_bundle else ():
                results += bench_generation(
                    args.dit_run, dit_bundle, threads, args.steps, args.repeats, guidance
                )
            if st_bundle:
                results += bench_prediction(args.st_run, st_bundle, threads, args.repeats)
            for r in results[-4:]:
                print(json.dumps(r), flush=True)
    print(
        f"\n{'task':<10}{'size':>8}{'CFG':>5}{'threads':>9}{'torch ms':>11}{'ORT ms':>9}"
        f"{'ORT speedup':>13}"
    )
    for r in results:
        size = r.get("batch", r.get("cells"))
        cfg = f"{r['guidance']:g}" if "guidance" in r else ""
        print(f"{r['task']:<10}{size:>8}{cfg:>5}{r['threads']:>9}{r['torch_s'] * 1e3:>11.1f}"
              f"{r['ort_s'] * 1e3:>9.1f}{r['speedup']:>12.2f}x")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
