"""The loader against its peers and its limit: cells/s delivering the same torch batch.

    latentcell benchmark loader --out DIR [--cells 200000] [--genes 2000] [--form csr|dense]
                                [--rounds 3] [--seconds 2] [--workdir DIR] [--loaders a,b]

One h5ad (synthetic, about 10% non-zero, saved by anndata: contiguous and uncompressed, as
most h5ad files are) and the Zarr store and WebDataset shards built from it. Every loader
delivers batches of ``--batch-size`` cells as a torch float32 tensor, sparse CSR
(``--form csr``, what the trainer moves to the GPU) or dense (``--form dense``):

    zarr_stream            CellStream over the Zarr store (defaults: shuffled units and pools)
    webdataset_stream      CellStream over the WebDataset shards (defaults)
    set_sampler            SetSampler over the Zarr store (ST's sets, 64 cells); counts the
                           control and the perturbed cells of each pair
    scdataset_b{B}_f{F}    scDataset (BlockShuffling(block_size=B), fetch_factor=F) over the
                           same h5ad opened backed by anndata, the way its docs pair them
    anndata_backed         anndata backed mode, random batches of rows (sorted in a batch)
    gather_to_torch        rows gathered from a CSR matrix already in RAM, then made a tensor
    gather_ceiling         the same row gather with no conversion: the ceiling any loader of
                           this data on one process can approach
    annbatch               listed as not measured below Python 3.12 (it needs 3.12)

Alternating in one run: each loader lives in its own process (so its peak RSS is its own),
and the parent asks them in turn for a window of ``--seconds``, ``--rounds`` times; a
loader's figure is the median of its windows, so a slow minute of a shared machine hits
every loader alike. Streams keep iterating across epochs between windows. Writes
``results.json`` (one entry per loader, the ratios and the issue's targets) and
``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

SCDATASET_SETTINGS = ((1, 16), (16, 16), (256, 16), (16, 64), (1024, 64))
STREAMS = ("zarr_stream", "webdataset_stream", "set_sampler")
REFERENCES = ("anndata_backed", "gather_to_torch", "gather_ceiling")
TARGETS = {  # the Scale and speed issue's targets, checked on every run
    "zarr_stream / best scdataset": 6.0,
    "zarr_stream / gather_ceiling": 0.35,
    "webdataset_stream / zarr_stream": 0.80,
    "set_sampler cells/s": 300_000,
}


def loader_names() -> list[str]:
    scdataset = [f"scdataset_b{b}_f{f}" for b, f in SCDATASET_SETTINGS]
    return [*STREAMS, *scdataset, *REFERENCES]


# -- the loaders (each built in its own process) --------------------------------------------


def deliver(X, form: str):
    """A scipy CSR batch as the tensor every loader hands over (the same code for all)."""
    import torch

    from latentcell.data_pipelines.batches import csr_to_torch

    if form == "dense":
        return torch.from_numpy(X.toarray().astype(np.float32, copy=False))
    return csr_to_torch(X.tocsr() if X.format != "csr" else X)


def _stream_items(stream, per_item: Callable) -> Iterator[int]:
    """Cells of each item, epoch after epoch, forever."""
    while True:
        stream.set_epoch(stream.epoch + 1)
        for item in stream.loader():
            yield per_item(item)


def _random_batches(read: Callable, n_cells: int, batch_size: int, seed: int) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    while True:
        rows = np.sort(rng.choice(n_cells, size=batch_size, replace=False))
        yield read(rows).shape[0]


class _BackedRows:
    """A backed h5ad's X as scDataset's data collection: ``len`` and sorted-row indexing
    (what ``scDataset(adata, ...)`` reads; without the obs columns it would also copy)."""

    def __init__(self, path: str):
        import anndata as ad

        self.adata = ad.read_h5ad(path, backed="r")

    def __len__(self) -> int:
        return self.adata.n_obs

    def __getitem__(self, rows):
        return self.adata.X[rows]


def _in_ram(path: str):
    """The h5ad's X in RAM with one index dtype (anndata reads int32 indices beside int64
    row pointers; scipy would then upcast the whole matrix on every gather)."""
    import anndata as ad
    import scipy.sparse as sp

    X = ad.read_h5ad(path).X.tocsr()
    dtype = np.int32 if X.nnz < 2**31 else np.int64
    return sp.csr_matrix((X.data, X.indices.astype(dtype), X.indptr.astype(dtype)), X.shape)


def build_loader(name: str, paths: dict, batch_size: int, form: str, seed: int) -> Iterator[int]:
    """An endless iterator of the cells in each delivered batch, for loader ``name``."""
    from latentcell.data_pipelines.stores import open_store

    if name in ("zarr_stream", "webdataset_stream"):
        from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig

        store = paths["zarr" if name == "zarr_stream" else "webdataset"]
        config = CellStreamConfig(batch_size=batch_size, seed=seed, output=form)
        stream = CellStream(partial(open_store, store), config)
        return _stream_items(stream, lambda b: int((~b["is_pad"]).sum()))
    if name == "set_sampler":
        from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig

        config = SetSamplerConfig(set_size=64, seed=seed, output=form)
        sampler = SetSampler(partial(open_store, paths["zarr"]), config)
        return _stream_items(
            sampler, lambda p: 0 if p["is_pad"] else 2 * len(p["perturbed"]["row"])
        )
    if name.startswith("scdataset_"):
        from scdataset import BlockShuffling, scDataset

        block, fetch = (int(part[1:]) for part in name.split("_")[1:])
        dataset = scDataset(
            _BackedRows(paths["h5ad"]), BlockShuffling(block_size=block), batch_size=batch_size,
            fetch_factor=fetch, batch_transform=partial(deliver, form=form), seed=seed,
        )  # fmt: skip

        def epochs():
            while True:
                for batch in dataset:
                    yield batch.shape[0]

        return epochs()
    if name == "anndata_backed":
        backed = _BackedRows(paths["h5ad"])
        read = lambda rows: deliver(backed[rows], form)  # noqa: E731
        return _random_batches(read, len(backed), batch_size, seed)
    if name in ("gather_to_torch", "gather_ceiling"):
        X = _in_ram(paths["h5ad"])
        convert = name == "gather_to_torch"
        read = (lambda rows: deliver(X[rows], form)) if convert else (lambda rows: X[rows])
        return _random_batches(read, X.shape[0], batch_size, seed)
    raise ValueError(f"unknown loader {name!r}; choose from {loader_names()}")


def _serve(name: str, paths: dict, batch_size: int, form: str, seed: int, conn) -> None:
    """A loader's process: answers each window request with its cells/s, then its peak RSS."""
    try:
        items = build_loader(name, paths, batch_size, form, seed)
        next(items)  # opened and warm before the first window
        conn.send(("ready", None))
        while (seconds := conn.recv()) is not None:
            cells, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                cells += next(items)
            conn.send(("window", cells / (time.perf_counter() - start)))
        conn.send(("done", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    except Exception as err:  # noqa: BLE001 - reported by the parent as this loader's failure
        conn.send(("error", f"{type(err).__name__}: {err}"))


def measure(names: list[str], paths: dict, args: argparse.Namespace) -> dict:
    """Every loader in its own process, asked for windows in turn; median cells/s each."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        parent, child = context.Pipe()
        proc = context.Process(target=_serve, daemon=True,
                               args=(name, paths, args.batch_size, args.form, args.seed, child))  # fmt: skip
        proc.start()
        workers[name] = (proc, parent)
    results = {name: {"windows": []} for name in names}
    alive = []
    for name, (_, conn) in workers.items():  # loaders open one after another
        kind, value = conn.recv()
        if kind == "error":
            results[name]["error"] = value
        else:
            alive.append(name)
    for round_ in range(args.rounds):
        for name in alive if round_ % 2 == 0 else alive[::-1]:
            conn = workers[name][1]
            conn.send(args.seconds)
            kind, value = conn.recv()
            if kind == "error":
                results[name]["error"] = value
                alive.remove(name)
                continue
            results[name]["windows"].append(round(value))
    for name in alive:
        conn = workers[name][1]
        conn.send(None)
        kind, value = conn.recv()
        results[name]["peak_rss_mb"] = round(value)
    for proc, _ in workers.values():
        proc.join(timeout=30)
    for entry in results.values():
        if entry["windows"]:
            entry["cells_per_s"] = round(float(np.median(entry["windows"])))
    return results


def ratios(results: dict) -> dict:
    """The issue's ratios from whichever loaders ran (a missing one leaves its ratio out)."""
    rate = {k: v["cells_per_s"] for k, v in results.items() if "cells_per_s" in v}
    scd = {k: v for k, v in rate.items() if k.startswith("scdataset_")}
    out = {}
    if "zarr_stream" in rate and scd:
        best = max(scd, key=scd.get)
        out["zarr_stream / best scdataset"] = rate["zarr_stream"] / scd[best]
        out["best scdataset setting"] = best
    pairs = [("zarr_stream", "gather_ceiling"), ("webdataset_stream", "zarr_stream"),
             ("zarr_stream", "gather_to_torch"), ("zarr_stream", "anndata_backed"),
             ("gather_to_torch", "gather_ceiling")]  # fmt: skip
    for a, b in pairs:
        if a in rate and b in rate:
            out[f"{a} / {b}"] = rate[a] / rate[b]
    if "set_sampler" in rate:
        out["set_sampler cells/s"] = rate["set_sampler"]
    return out


def check_targets(found: dict) -> dict:
    return {k: {"target": t, "measured": found[k], "met": found[k] >= t}
            for k, t in TARGETS.items() if k in found}  # fmt: skip


def annbatch_entry() -> dict:
    if sys.version_info < (3, 12):
        return {"not_measured": f"annbatch needs Python >= 3.12; this is {sys.version.split()[0]}"}
    return {"not_measured": "annbatch has no adapter here yet; run it beside this benchmark"}


def write_report(out: Path, report: dict) -> None:
    lines = [f"# Loader benchmark ({report['setup']['cells']:,} cells x "
             f"{report['setup']['genes']:,} genes, batch {report['setup']['batch_size']}, "
             f"{report['setup']['form']} torch float32)", "",
             "| loader | cells/s (median) | windows | peak RSS MB |", "|---|---|---|---|"]  # fmt: skip
    for name, entry in report["loaders"].items():
        if "cells_per_s" in entry:
            lines.append(f"| {name} | {entry['cells_per_s']:,} | "
                         f"{', '.join(f'{w:,}' for w in entry['windows'])} | "
                         f"{entry.get('peak_rss_mb', '')} |")  # fmt: skip
        else:
            why = entry.get("error") or entry.get("not_measured", "")
            lines.append(f"| {name} | not measured: {why} | | |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for key, value in report["ratios"].items():
        if isinstance(value, str):
            continue
        target = report["targets"].get(key)
        shown = f"{value:,.0f}" if value > 1000 else f"{value:.2f}"
        lines.append(f"| {key} | {shown} | {target['target'] if target else ''} | "
                     f"{'yes' if target and target['met'] else ('no' if target else '')} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from latentcell.benchmarks.readers import add_data_arguments

    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    add_data_arguments(parser)
    parser.add_argument("--form", choices=("csr", "dense"), default="csr",
                        help="the torch float32 batch every loader delivers")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="windows per loader")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one window")
    parser.add_argument("--loaders", default="",
                        help=f"comma-separated subset of: {','.join(loader_names())}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from latentcell.benchmarks.readers import prepare
    from latentcell.data_pipelines.errors import UserInputError

    names = [n for n in args.loaders.split(",") if n] or loader_names()
    unknown = sorted(set(names) - set(loader_names()))
    if unknown:
        raise UserInputError(f"--loaders: unknown {unknown}; choose from {loader_names()}")
    if args.rounds < 1 or args.seconds <= 0:
        raise UserInputError("--rounds must be >= 1 and --seconds > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp) / f"cells{args.cells}_genes{args.genes}"
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.cells:,} cells x {args.genes:,} genes in {workdir}")
        setup = prepare(args, workdir)
        print(f"measuring {len(names)} loaders, {args.rounds} windows of {args.seconds:g} s each")
        results = measure(names, setup["paths"], args)
    results["annbatch"] = annbatch_entry()
    found = ratios(results)
    setup = {k: v for k, v in setup.items() if k != "paths"}
    setup.update(
        form=args.form, rounds=args.rounds, seconds=args.seconds, python=sys.version.split()[0]
    )
    report = {"loaders": results, "ratios": found, "targets": check_targets(found), "setup": setup}
    for name, entry in results.items():
        shown = f"{entry['cells_per_s']:>10,} cells/s" if "cells_per_s" in entry else "not measured"
        print(f"  {name:<22} {shown}  {entry.get('error') or entry.get('not_measured') or ''}")
    for key, value in found.items():
        if not isinstance(value, str):
            met = report["targets"].get(key)
            note = (
                ""
                if met is None
                else f"  (target {met['target']}: {'met' if met['met'] else 'NOT met'})"
            )
            print(f"  {key:<36} {value:,.2f}{note}")
    write_report(out, report)
    print(f"wrote {out / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
