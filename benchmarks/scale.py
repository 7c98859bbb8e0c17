"""Scale: synthesize N cells (streamed), build the store, stream one epoch on one process;
each phase's wall time and peak RSS, the store's size, the stream's cells/s.

    latentcell benchmark scale --out DIR [--cells 1000000 10000000] [--genes 2000]
                               [--format zarr] [--keep]

Each phase runs in its own process (``latentcell data synth``, ``latentcell data build``, and
a one-epoch ``CellStream`` yielding torch sparse CSR batches, as training reads them), so its peak RSS is its own (``os.wait4``'s
``ru_maxrss``), not the largest of the run. With several ``--cells`` the sizes run side by
side: memory that grows with the store shows as a ratio above 1 in the last table. The
h5ad input is deleted after each build unless ``--keep`` (10M x 2,000 genes is ~14 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STREAM = """
import json, sys, time
import torch
from functools import partial
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.stores import open_store
stream = CellStream(partial(open_store, sys.argv[1]),
                    CellStreamConfig(batch_size=int(sys.argv[2])))
cells, start = 0, time.perf_counter()
for batch in stream.loader():
    cells += int((~torch.as_tensor(batch["is_pad"])).sum())
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"cells": cells, "seconds": seconds}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="working folder (inputs, stores, results)")
    parser.add_argument("--cells", type=int, nargs="+", default=[1_000_000],
                        help="store sizes to run, e.g. 1000000 10000000")  # fmt: skip
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--format", default="zarr", choices=("zarr", "webdataset"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the h5ad inputs")


def _peak_mb(argv: list[str], env: dict) -> dict:
    """Like ``_phase``, with the child's own peak RSS from ``os.wait4``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            text=True)  # fmt: skip
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} failed with exit code {proc.returncode}")
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": out}  # fmt: skip


def _size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def run_size(n_cells: int, args: argparse.Namespace, out: Path) -> dict:
    cli = [sys.executable, "-m", "latentcell.launch"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    h5ad, store = out / f"cells_{n_cells}.h5ad", out / f"store_{n_cells}.{args.format}"
    row: dict = {"cells": n_cells, "genes": args.genes, "format": args.format}
    if not store.exists():
        synth = _peak_mb([*cli, "data", "synth", "--out", str(h5ad), "--cells", str(n_cells),
                          "--genes", str(args.genes), "--perturbations", "50",
                          "--cell-types", "4", "--batches", "8"], env)  # fmt: skip
        row["synth"] = {k: synth[k] for k in ("seconds", "peak_rss_mb")}
        row["h5ad_gb"] = round(h5ad.stat().st_size / 1e9, 2)
        build = _peak_mb([*cli, "data", "build", str(h5ad), "--out", str(store), "--schema",
                          "vcc", "--format", args.format], env)  # fmt: skip
        row["build"] = {k: build[k] for k in ("seconds", "peak_rss_mb")}
        if not args.keep:
            h5ad.unlink()
    row["store_gb"] = round(_size_gb(store), 2)
    stream = _peak_mb([sys.executable, "-c", STREAM, str(store), str(args.batch_size)], env)
    result = json.loads(stream["stdout"].split("RESULT ", 1)[1])
    row["stream"] = {"seconds": round(result["seconds"], 1),
                     "peak_rss_mb": stream["peak_rss_mb"], "cells": result["cells"],
                     "cells_per_s": round(result["cells"] / result["seconds"])}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free / 1e9
    rows = [run_size(n, args, out) for n in sorted(args.cells)]
    report = {"rows": rows, "disk_free_gb_at_start": round(free, 1),
              "machine": f"{os.cpu_count()} cores"}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = _markdown(rows)
    (out / "results.md").write_text(text)
    print(text, end="")
    return 0


def _markdown(rows: list[dict]) -> str:
    lines = ["| cells | build s | build peak MB | store GB | stream cells/s | stream peak MB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        build = r.get("build", {})
        lines.append(f"| {r['cells']:,} | {build.get('seconds', '-')} | "
                     f"{build.get('peak_rss_mb', '-')} | {r['store_gb']} | "
                     f"{r['stream']['cells_per_s']:,} | {r['stream']['peak_rss_mb']} |")  # fmt: skip
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = last["stream"]["peak_rss_mb"] / first["stream"]["peak_rss_mb"]
        lines += ["", f"stream peak RSS, {last['cells']:,} vs {first['cells']:,} cells: "
                  f"x{growth:.2f} for x{last['cells'] / first['cells']:.0f} the cells"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
