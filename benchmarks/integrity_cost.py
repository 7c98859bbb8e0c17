"""What the read-time integrity checks cost the cell stream (``integrity``), as paired ratios.

    latentcell benchmark integrity --cells 200000 --genes 2000 \\
        --workdir bench --rounds 6 --seconds 4

Builds (or reuses, with ``--workdir``) the loader benchmark's Zarr store and WebDataset
shards (``benchmark.prepare``), then streams each with checks on and off in alternation, in
one process, ``--rounds`` times: the 2-core machines swing +-30% over minutes, so only a
ratio of neighbouring windows means anything. Prints cells/s and the median of the paired
ratios (checked / unchecked) per format; target >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from latentcell.benchmarks.readers import prepare, real_cells, stream_cells_per_s
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.stores import open_store


def paired(path: str, batch_size: int, seconds: float, rounds: int) -> dict:
    """cells/s with and without checks, alternating which goes first each round."""
    streams = {
        verify: CellStream(
            partial(open_store, path, verify=verify),
            CellStreamConfig(batch_size=batch_size, output="csr"),
        )
        for verify in (True, False)
    }
    for stream in streams.values():  # warm-up: page cache, imports, first pools
        stream_cells_per_s(stream, min(1.0, seconds), real_cells)
    runs = {True: [], False: []}
    for r in range(rounds):
        for verify in (r % 2 == 0, r % 2 == 1):
            runs[verify].append(stream_cells_per_s(streams[verify], seconds, real_cells))
    ratios = np.array(runs[True]) / np.array(runs[False])
    return {
        "checked_cells_per_s": round(float(np.median(runs[True]))),
        "unchecked_cells_per_s": round(float(np.median(runs[False]))),
        "ratio_median": round(float(np.median(ratios)), 4),
        "ratios": [round(float(x), 4) for x in ratios],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0, help="per window")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--workdir", help="keep and reuse the data here (default: a temp folder)")
    parser.add_argument("--out", help="JSON file for the results")


def run(args: argparse.Namespace) -> int:
    data = argparse.Namespace(perturbations=50, cell_types=4, batches=8, seed=0, **vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp) / f"cells{args.cells}_genes{args.genes}"
        workdir.mkdir(parents=True, exist_ok=True)
        setup = prepare(data, workdir)
        report = {"setup": {k: v for k, v in setup.items() if k != "paths"}}
        for fmt in ("zarr", "webdataset"):
            report[fmt] = paired(setup["paths"][fmt], args.batch_size, args.seconds, args.rounds)
            r = report[fmt]
            print(f"{fmt:<11} checked {r['checked_cells_per_s']:>9,} cells/s   unchecked "
                  f"{r['unchecked_cells_per_s']:>9,} cells/s   ratio {r['ratio_median']:.3f} "
                  f"(rounds {r['ratios']})")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
