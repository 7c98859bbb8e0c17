"""How many units in flight a rank needs to stream a store from object storage at full speed.

    latentcell benchmark remote-latency --cells 50000 --genes 500 --out bench/remote

Object stores answer each request in 10-100 ms, however small. The cell stream reads a store
unit by unit (a Zarr chunk of cells: two requests, ``X/data`` and ``X/indices``; a WebDataset
shard: one), so a loader that waits on each unit in turn spends its time waiting.
``CellStreamConfig.fetch_units`` keeps that many units in flight per slot.

This serves a store built here (``readers.prepare``) over a loopback HTTP server that sleeps a
configurable delay before answering each request (``--delays``, default 0, 20 and 100 ms),
and streams it with ``CellStream`` for each ``--fetch-units`` count. Reports steady-state
cells/s (timed from the first batch), the time to open the store, the ratio to reading the
same store from local disk, and per delay the smallest count within 10% of the best one:
the units in flight that hide that latency. Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from latentcell.benchmarks.readers import prepare, real_cells
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.stores import open_store


class _DelayServer(http.server.ThreadingHTTPServer):
    """A static file server whose every answer waits ``delay.value`` milliseconds (an object
    store's first-byte latency). It runs in its own process (``_serve``): in the loader's
    process its Python would compete for the GIL with the loader being measured."""

    request_queue_size = 256  # the default 5 drops concurrent connections (1 s retries)
    daemon_threads = True


class _DelayHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        time.sleep(self.server.delay.value / 1000)
        super().do_GET()

    def do_HEAD(self):  # noqa: N802
        time.sleep(self.server.delay.value / 1000)
        super().do_HEAD()

    def log_message(self, *args):
        pass


def _serve(directory: str, delay, port) -> None:
    server = _DelayServer(("127.0.0.1", 0), functools.partial(_DelayHandler, directory=directory))
    server.delay = delay
    port.value = server.server_address[1]
    server.serve_forever()


def cells_per_s(path: str, fetch_units: int, args) -> dict:
    """Open the store at ``path`` and stream it for ``args.seconds`` after the first batch."""
    t0 = time.perf_counter()
    reader = open_store(path)
    config = CellStreamConfig(
        batch_size=args.batch_size, buffer_units=args.buffer_units, fetch_units=fetch_units
    )
    stream = CellStream(reader, config, rank=0, world_size=1)
    opened = time.perf_counter() - t0
    cells, start, epoch = 0, None, 0
    while True:
        stream.set_epoch(epoch)
        for batch in stream.loader():
            if start is None:  # the first batch waits for the first pool: not steady state
                start, first_batch = time.perf_counter(), time.perf_counter() - t0 - opened
                continue
            cells += real_cells(batch)
            if time.perf_counter() - start >= args.seconds:
                return {
                    "cells_per_s": round(cells / (time.perf_counter() - start)),
                    "open_s": round(opened, 3),
                    "first_batch_s": round(first_batch, 3),
                }
        epoch += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--buffer-units", type=int, default=8, help="CellStreamConfig's")
    parser.add_argument("--delays", default="0,20,100", help="ms per request, comma-separated")
    parser.add_argument("--fetch-units", default="1,2,4,8,16", help="units in flight to try")
    parser.add_argument("--formats", default="zarr,webdataset")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per run")
    parser.add_argument("--workdir", help="keep and reuse the data here (default: a temp folder)")
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")


def run(args: argparse.Namespace) -> int:
    delays = [float(d) for d in args.delays.split(",")]
    counts = [int(n) for n in args.fetch_units.split(",")]
    data = argparse.Namespace(perturbations=50, cell_types=4, batches=8, seed=0, **vars(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp) / f"cells{args.cells}_genes{args.genes}"
        workdir.mkdir(parents=True, exist_ok=True)
        setup = prepare(data, workdir)
        spawn = multiprocessing.get_context("spawn")  # not fork: torch and zarr threads
        delay, port = spawn.Value("d", 0.0), spawn.Value("i", 0)
        server = spawn.Process(target=_serve, args=(str(workdir), delay, port), daemon=True)
        server.start()
        while not port.value:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port.value}"
        report = {"setup": {k: v for k, v in setup.items() if k != "paths"}, "args": vars(args)}
        try:
            for fmt in args.formats.split(","):
                path = setup["paths"][fmt]
                url = f"{base}/{Path(path).name}"
                report[fmt] = _one_format(fmt, path, url, delay, delays, counts, args)
        finally:
            server.terminate()
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(_markdown(report, args.formats.split(",")))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _one_format(fmt, local_path, url, server_delay, delays, counts, args) -> dict:
    local = cells_per_s(str(local_path), 1, args)
    n_units = len(open_store(local_path).meta.unit_sizes)
    print(f"{fmt}: {n_units} units; local disk {local['cells_per_s']:,} cells/s")
    result = {"n_units": n_units, "local": local, "remote": {}}
    for delay in delays:
        server_delay.value = delay
        runs = {n: cells_per_s(url, n, args) for n in counts}
        best = max(r["cells_per_s"] for r in runs.values())
        needed = min(n for n, r in runs.items() if r["cells_per_s"] >= 0.9 * best)
        for n, r in runs.items():
            r["ratio_to_local"] = round(r["cells_per_s"] / local["cells_per_s"], 3)
            print(f"  {delay:>5.0f} ms  fetch_units {n:>2}: {r['cells_per_s']:>8,} cells/s  "
                  f"x{r['ratio_to_local']:.2f} of local  (open {r['open_s']:.2f} s)")  # fmt: skip
        print(f"  {delay:>5.0f} ms: {needed} units in flight reach 90% of the best")
        result["remote"][str(int(delay))] = {"runs": runs, "units_needed": needed}
    return result


def _markdown(report: dict, formats: list[str]) -> str:
    setup = report["setup"]
    lines = [
        "# Remote latency: cells/s of CellStream over HTTP with a delay per request",
        "",
        f"{setup['cells']:,} cells x {setup['genes']} genes, batch {setup['batch_size']}, "
        f"buffer_units {report['args']['buffer_units']}; one process, loopback server.",
        "",
    ]
    for fmt in formats:
        r = report[fmt]
        lines += [f"## {fmt} ({r['n_units']} units; local disk {r['local']['cells_per_s']:,} "
                  "cells/s)", "", "| delay (ms) | fetch_units | cells/s | x local | open (s) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for delay, d in r["remote"].items():
            for n, run_ in d["runs"].items():
                lines.append(f"| {delay} | {n} | {run_['cells_per_s']:,} | "
                             f"{run_['ratio_to_local']:.2f} | {run_['open_s']:.2f} |")  # fmt: skip
        lines += [""] + [
            f"- {delay} ms: {d['units_needed']} units in flight reach 90% of the best"
            for delay, d in r["remote"].items()
        ] + [""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
