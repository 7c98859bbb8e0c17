"""``latentcell demo``: the project's main job end to end on a built-in synthetic dataset.

Today: synthesize a VCC-schema h5ad -> build a Zarr v3 store (HVGs + perturbed targets) ->
stream one epoch through ``CellStream`` and a few ST-style sets through ``SetSampler`` ->
print a summary. Later stages (training, generation, export) extend the same command.
Everything stays under ``--out`` (default ``runs/demo``); re-running reuses what exists.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the end-to-end demo on synthetic data")
    parser.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=20)
    parser.add_argument("--cell-types", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--hvg", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
    from latentcell.data_pipelines.inspect_store import summarize_store
    from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
    from latentcell.data_pipelines.stores import open_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h5ad, store = out / "synthetic_vcc.h5ad", out / "store.zarr"

    step = _Step()
    reused = h5ad.exists()
    if not reused:
        config = SynthConfig(
            schema="vcc",
            n_cells=args.cells,
            n_genes=args.genes,
            n_perturbations=args.perturbations,
            n_cell_types=args.cell_types,
            n_batches=args.batches,
            seed=args.seed,
        )
        synthesize(config, h5ad)
    step.done(f"{'reused' if reused else 'synthesized'} {h5ad}")

    reused = store.exists()
    if not reused:
        build_store([h5ad], store, format="zarr", schema="vcc", hvg=args.hvg, combine_targets=True)
    step.done(f"{'reused' if reused else 'built'} {store}")
    summary = summarize_store(str(store))
    print(json.dumps({k: summary[k] for k in ("n_cells", "n_genes", "n_groups", "roles")}))

    stream = CellStream(
        partial(open_store, store), CellStreamConfig(batch_size=256, seed=args.seed)
    )
    n_cells = n_batches = 0
    seen_types: set[int] = set()
    for batch in stream.loader():
        real = ~batch["is_pad"]
        n_cells += int(real.sum())
        n_batches += 1
        seen_types.update(batch["obs"]["cell_type"][real].tolist())
    seconds = step.done(f"streamed one epoch: {n_batches} batches, {n_cells} cells")
    print(f"  cell stream: {n_cells / seconds:,.0f} cells/s; cell types seen: {len(seen_types)}")

    sets = SetSampler(partial(open_store, store), SetSamplerConfig(set_size=64, seed=args.seed))
    levels: dict[str, int] = {}
    n_sets = 0
    for pair in sets.loader():
        levels[pair["match_level"]] = levels.get(pair["match_level"], 0) + 1
        n_sets += 1
    seconds = step.done(f"sampled {n_sets} (control set, perturbed set) pairs of 64 cells")
    print(f"  set sampler: {n_sets / seconds:,.0f} sets/s; control matched by {levels}")
    print(f"demo finished; outputs in {out}")
    return 0


class _Step:
    """Prints each finished step with its duration."""

    def __init__(self):
        self.start = time.perf_counter()

    def done(self, message: str) -> float:
        seconds = time.perf_counter() - self.start
        print(f"[{seconds:6.1f}s] {message}")
        self.start = time.perf_counter()
        return seconds
