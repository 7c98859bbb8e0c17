"""The end of a distributed build: the finished parts become one store, published last.

Cells keep the in-process build's order (input by input, each sorted by group), so the merged
store reads back exactly like ``build_store`` without a scheduler; group ranges are
concatenated and a run that continues across two parts is joined, as ``GroupRanges`` does.

- WebDataset: the parts' shards already hold global rows and unique names; they are
  hard-linked (copied across file systems) into the new store and listed in one manifest.
  Each part's last shard may be short, so shard boundaries differ from a one-process build.
- Zarr: the store is created at its final size (``ZarrStoreWriter.presize``) and workers
  copy disjoint whole-chunk ranges from the parts into it (``fill_zarr_range``), then the
  driver writes the group ranges, checksum tables and the sealed manifest. Chunking equals
  the one-process build's (``nnz_chunk`` from the first part, as the first cells set it
  there), except when the first input has fewer cells than a chunk.

Either way the manifest is written last and the directory renamed into place (``atomic``):
a merge that fails leaves the parts, and no store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from .blocks import ROLES, StoreSpec
from .store_common import write_manifest
from .store_layout import NAMES_COLUMN
from .zarr_chunks import chunk_reader


def merged_groups(summaries: list[dict], offsets: list[int]) -> pd.DataFrame:
    """The parts' group ranges, shifted by ``offsets`` and concatenated; a run that continues
    from one part into the next becomes one range."""
    frames = [pd.DataFrame(s["groups"]) for s in summaries]
    for frame, offset in zip(frames, offsets, strict=True):
        frame[["start", "stop"]] += offset
    groups = pd.concat(frames, ignore_index=True)
    keys = groups[list(ROLES)].to_numpy()
    same = np.zeros(len(groups), bool)
    same[1:] = (keys[1:] == keys[:-1]).all(axis=1)
    starts = groups.loc[~same].reset_index(drop=True)
    stops = np.append(starts["start"].to_numpy()[1:], groups["stop"].iloc[-1] if len(groups) else 0)
    starts["stop"] = stops[: len(starts)]
    out = {role: starts[role].astype(np.int32) for role in ROLES}
    return pd.DataFrame({**out, "start": starts["start"].astype(np.int64),
                         "stop": starts["stop"].astype(np.int64)})  # fmt: skip


def category_totals(spec: StoreSpec, summaries: list[dict]) -> dict[str, np.ndarray]:
    totals = {c: np.zeros(len(v), np.int64) for c, v in spec.categories.items()}
    for s in summaries:
        for col, counts in s["category_counts"].items():
            totals[col] += np.asarray(counts, np.int64)
    return totals


# ---------------------------------------------------------------- WebDataset


def merge_webdataset(out, spec: StoreSpec, summaries: list[dict], overwrite: bool) -> str:
    """Link the parts' shards into a new store and write its manifest (see module doc)."""
    from .atomic import AtomicDir
    from .webdataset_store import shards_manifest

    n_cells = sum(s["n_cells"] for s in summaries)
    nnz = sum(s["nnz"] for s in summaries)
    groups = merged_groups(summaries, [0] * len(summaries))  # part rows are global already
    shards = [shard for s in summaries for shard in s["shards"]]
    with AtomicDir(out, overwrite=overwrite) as build:
        for s in summaries:
            for shard in s["shards"]:
                _link(Path(s["part_dir"]) / shard["name"], build.tmp / shard["name"])
        counts = (n_cells, nnz, category_totals(spec, summaries))
        block_cells = summaries[0]["block_cells"]
        write_manifest(build.tmp, shards_manifest(spec, counts, block_cells, groups, shards))
        return str(build.commit())


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links: copy
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------- Zarr


def zarr_ranges(spec: StoreSpec, summaries: list[dict], chunk_cells: int, nnz_chunk: int,
                n_tasks: int) -> list[dict]:  # fmt: skip
    """Per task: whole-chunk ranges of the per-cell arrays and of X/data, X/indices, and the
    parts (directory, first row, cells, first entry, entries) those ranges need."""
    sizes = np.array([s["n_cells"] for s in summaries], np.int64)
    nnzs = np.array([s["nnz"] for s in summaries], np.int64)
    first_rows = np.concatenate([[0], np.cumsum(sizes)])
    first_nnz = np.concatenate([[0], np.cumsum(nnzs)])
    n, nnz = int(first_rows[-1]), int(first_nnz[-1])
    parts = [(s["part_dir"], int(f), int(c), int(e), int(z)) for s, f, c, e, z in
             zip(summaries, first_rows, sizes, first_nnz, nnzs, strict=False)]  # fmt: skip
    cell_chunks = np.array_split(np.arange(-(-(n + 1) // chunk_cells)), n_tasks)
    x_chunks = np.array_split(np.arange(-(-nnz // nnz_chunk)), n_tasks)
    tasks = []
    for cells, xs in zip(cell_chunks, x_chunks, strict=True):
        rows = (
            (int(cells[0]) * chunk_cells, int(cells[-1] + 1) * chunk_cells)
            if len(cells)
            else (0, 0)
        )
        entries = (
            (int(xs[0]) * nnz_chunk, min(int(xs[-1] + 1) * nnz_chunk, nnz)) if len(xs) else (0, 0)
        )
        if rows[1] > rows[0] or entries[1] > entries[0]:
            needed = [part for part in parts if _overlaps(part, rows, entries)]
            tasks.append({"rows": rows, "entries": entries, "n_cells": n, "nnz": nnz,
                          "parts": needed})  # fmt: skip
    return tasks


def _overlaps(part: tuple, rows: tuple, entries: tuple) -> bool:
    """Whether a task's row or entry range needs ``part`` (so a task carries only those)."""
    _, first_row, n_cells, first_entry, nnz = part
    return (first_row < rows[1] and rows[0] < first_row + n_cells) or (
        first_entry < entries[1] and entries[0] < first_entry + nnz
    )


def per_cell_arrays(spec: StoreSpec) -> list[str]:
    """The store's (n_cells,) arrays (``X/indptr`` aside), as ZarrStoreWriter creates them."""
    names = ["library_size", *(f"obs/{c}/codes" for c in spec.categories)]
    return names + [f"obs/{c}" for c in spec.numeric_dtypes] + [f"obs/{NAMES_COLUMN}"]


def fill_zarr_range(store_tmp: str, arrays: list[str], task: dict) -> int:
    """Copy one task's chunk ranges from the parts into the presized store at ``store_tmp``
    (runs on a worker; ranges of different tasks never share a chunk). Returns cells copied."""
    group = zarr.open_group(store_tmp, mode="r+", zarr_format=3)
    out = _Writable(group)
    parts = _Parts(task["parts"])
    n, (a, b) = task["n_cells"], task["rows"]
    if b > a:
        stop = min(b, n)
        for name in arrays:
            if a < stop:
                out[name][a:stop] = parts.cells(name, a, stop)
        indptr = parts.indptr(a, stop) if a < stop else np.zeros(0, np.int64)
        if b > n >= a:  # the last position, one past the last cell
            indptr = np.append(indptr, np.int64(task["nnz"]))
        out["X/indptr"][a : a + len(indptr)] = indptr
    lo, hi = task["entries"]
    if hi > lo:
        for name in ("X/data", "X/indices"):
            out[name][lo:hi] = parts.entries(name, lo, hi)
    return max(0, min(b, n) - a)


class _Writable:
    """The store's arrays as the writer made them: every chunk written, also all-zero ones
    (``integrity``); ``write_empty_chunks`` is a runtime setting, so it is set again here."""

    def __init__(self, group: zarr.Group):
        self.group = group

    def __getitem__(self, name: str) -> zarr.Array:
        return self.group[name].with_config({"write_empty_chunks": True})


class _Parts:
    """Range reads over the parts, as if they were one array (checksums verified)."""

    def __init__(self, parts: list[tuple]):
        self.parts = parts
        self.first_rows = np.array([p[1] for p in parts], np.int64)
        self.first_nnz = np.array([p[3] for p in parts], np.int64)
        self._groups: dict[str, zarr.Group] = {}

    def _read(self, part_dir: str, name: str, a: int, b: int) -> np.ndarray:
        group = self._groups.get(part_dir)
        if group is None:
            group = self._groups[part_dir] = zarr.open_group(part_dir, mode="r", zarr_format=3)
        reader = chunk_reader(group[name], Path(part_dir))
        values = reader.read(a, b) if reader is not None else group[name][a:b]
        return values.astype(str) if values.dtype == object else values

    def _spans(self, starts: np.ndarray, sizes_at: int, a: int, b: int):
        first = int(np.searchsorted(starts, a, side="right")) - 1
        for i in range(max(first, 0), len(self.parts)):
            part = self.parts[i]
            p0, size = int(starts[i]), part[sizes_at]
            if p0 >= b:
                break
            lo, hi = max(a, p0), min(b, p0 + size)
            if hi > lo:
                yield part, lo - p0, hi - p0

    def cells(self, name: str, a: int, b: int) -> np.ndarray:
        pieces = [
            self._read(p[0], name, lo, hi) for p, lo, hi in self._spans(self.first_rows, 2, a, b)
        ]
        return np.concatenate(pieces)

    def indptr(self, a: int, b: int) -> np.ndarray:
        """Global row pointers of rows [a, b): each part's local pointers plus its offset."""
        pieces = [self._read(p[0], "X/indptr", lo, hi) + p[3]
                  for p, lo, hi in self._spans(self.first_rows, 2, a, b)]  # fmt: skip
        return np.concatenate(pieces).astype(np.int64)

    def entries(self, name: str, a: int, b: int) -> np.ndarray:
        pieces = [
            self._read(p[0], name, lo, hi) for p, lo, hi in self._spans(self.first_nnz, 4, a, b)
        ]
        return np.concatenate(pieces)
