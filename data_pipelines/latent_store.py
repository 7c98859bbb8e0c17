"""A store of per-cell latent vectors (VAE posterior means) beside the cells' conditions.

The second stage of latent diffusion trains on these instead of counts, so they are written
once, streamed unit by unit from the count store (memory stays at one unit), and read back
through the same ``CellStream`` as counts: ``LatentStoreReader`` is a ``StoreReader`` whose
blocks carry a dense ``(n, n_latent)`` X. Its read units mirror the count store's units, so
a train/validation split by units or rows (``unit_split``, ``cell_split``) holds out the same
cells in both.

Layout (a Zarr v3 group; built in ``<out>.tmp-<hex>``, renamed into place when complete)::

    manifest.json        {"format": "latent", n_cells, n_genes (= n_latent), unit_sizes, var
                          (z0..z{d-1}), obs categories/numeric, roles, control_label,
                          "source": {path, manifest_sha256}, "encoder": {...}, checksums}
    z                    float32 (n_cells, n_latent)
    library_size         float32 (n_cells,)      the count store's library sizes
    obs/<col>/codes      int32 (n_cells,)        every categorical column of the count store
    obs/<col>            numeric (n_cells,)      every numeric column
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .atomic import AtomicDir, sha256_file, sha256_tree
from .blocks import CellBlock, StoreReader
from .integrity import corrupt
from .store_common import (
    check_row_range,
    latentcell_version,
    meta_from_manifest,
    read_manifest,
    write_manifest,
)
from .store_layout import FORMAT_VERSION, MANIFEST_NAME

__all__ = ["LATENT_FORMAT", "LatentStoreReader", "write_latent_store"]

LATENT_FORMAT = "latent"
# Keep the whole store in memory when it takes at most this many bytes (read once per process).
_CACHE_BYTES = 512 << 20


def write_latent_store(
    source: StoreReader,
    encode: Callable[[CellBlock], np.ndarray],
    out: str | os.PathLike,
    n_latent: int,
    provenance: dict | None = None,
    overwrite: bool = False,
    chunk_cells: int = 16384,
) -> Path:
    """Encode every cell of ``source`` (in row order, one read unit at a time) with
    ``encode(block) -> (n, n_latent) float32`` and publish the store at ``out``."""
    meta = source.meta
    n = meta.n_cells
    cat_cols, num_cols = list(meta.categories), list(meta.numeric_columns)
    numeric_dtypes = meta.manifest.get("obs", {}).get("numeric", {})
    with AtomicDir(out, overwrite=overwrite) as build:
        root = zarr.open_group(build.tmp, mode="w", zarr_format=3)
        chunk = min(chunk_cells, max(n, 1))

        def array(name: str, width: int | None, dtype) -> zarr.Array:
            """Checksummed chunks, every one written (``integrity``)."""
            shape, chunks = ((n, width), (chunk, width)) if width else ((n,), (chunk,))
            return root.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype,
                compressors=[ZstdCodec(), Crc32cCodec()], config={"write_empty_chunks": True},
            )  # fmt: skip

        arrays = {"z": array("z", n_latent, np.float32)}
        arrays["library_size"] = array("library_size", None, np.float32)
        for col in cat_cols:
            arrays[f"obs/{col}/codes"] = array(f"obs/{col}/codes", None, np.int32)
        for col in num_cols:
            arrays[f"obs/{col}"] = array(
                f"obs/{col}", None, np.dtype(numeric_dtypes.get(col, "float64"))
            )
        rows = _RowBuffer(arrays, chunk)
        for unit in range(len(meta.unit_sizes)):
            block = source.read_unit(unit)
            z = np.asarray(encode(block), dtype=np.float32)
            if z.shape != (block.n_cells, n_latent) or not np.isfinite(z).all():
                raise ValueError(
                    f"encoder returned {z.shape} (finite: {np.isfinite(z).all()}) for unit "
                    f"{unit} of {meta.path}; expected ({block.n_cells}, {n_latent})"
                )
            columns = {"z": z, "library_size": block.library_size}
            columns.update({f"obs/{c}/codes": block.codes[c] for c in cat_cols})
            columns.update({f"obs/{c}": block.numeric[c] for c in num_cols})
            rows.append(columns, block.n_cells)
        rows.flush()
        if rows.written != n:
            raise ValueError(f"{meta.path}: units hold {rows.written} cells, the manifest says {n}")
        manifest = {
            "format": LATENT_FORMAT,
            "version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "latentcell_version": latentcell_version(),
            "n_cells": n,
            "n_genes": n_latent,
            "nnz": n * n_latent,
            "unit_sizes": [int(s) for s in meta.unit_sizes],
            "var": {
                "gene_key": [f"z{i}" for i in range(n_latent)],
                "gene_id": [""] * n_latent,
                "gene_symbol": [""] * n_latent,
            },
            "obs": {
                "categorical": {c: list(v) for c, v in meta.categories.items()},
                "numeric": {c: str(np.dtype(numeric_dtypes.get(c, "float64"))) for c in num_cols},
            },
            "roles": dict(meta.roles),
            "control_label": meta.control_label,
            "source": {
                "path": str(Path(meta.path).absolute()),
                "manifest_sha256": source_fingerprint(meta.path),
                "n_genes": meta.n_genes,
            },
            "encoder": provenance or {},
            "checksums": {name: sha256_tree(build.tmp / name) for name in sorted(arrays)},
        }
        write_manifest(build.tmp, manifest)
        return build.commit()


class _RowBuffer:
    """Collects rows and writes them once at least a chunk's worth is buffered, so a chunk is
    re-encoded at most twice instead of once per unit (exactly once when the chunk size is
    a multiple of the unit size)."""

    def __init__(self, arrays: dict[str, zarr.Array], chunk: int) -> None:
        self.arrays, self.chunk = arrays, chunk
        self.parts: list[dict[str, np.ndarray]] = []
        self.buffered = self.written = 0

    def append(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.parts.append(columns)
        self.buffered += n
        if self.buffered >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        stop = self.written + self.buffered
        for name, array in self.arrays.items():
            array[self.written : stop] = np.concatenate([p[name] for p in self.parts])
        self.written, self.parts, self.buffered = stop, [], 0


def source_fingerprint(store_path: str | os.PathLike) -> str:
    """sha256 of a count store's manifest (which holds the checksums of all its data)."""
    return sha256_file(Path(store_path) / MANIFEST_NAME)


class LatentStoreReader:
    """``StoreReader`` over a latent store; picklable, opens lazily in each process."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = _CACHE_BYTES, **_ignored):
        self.path = Path(path).absolute()
        manifest = read_manifest(self.path)
        if manifest["format"] != LATENT_FORMAT:
            raise ValueError(f"{self.path} is a {manifest['format']} store, not a latent store")
        self.manifest = manifest
        sizes = manifest.get("unit_sizes")
        if not isinstance(sizes, list):
            raise corrupt(self.path / MANIFEST_NAME, "unit_sizes", "missing or not a list")
        self.meta = meta_from_manifest(manifest, str(self.path), sizes)
        self._starts = np.concatenate([[0], np.cumsum(self.meta.unit_sizes)])
        self.cache_bytes = cache_bytes
        self._arrays: dict | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _names(self) -> list[str]:
        return (
            ["z", "library_size"]
            + [f"obs/{c}/codes" for c in self.meta.categories]
            + [f"obs/{c}" for c in self.meta.numeric_columns]
        )

    def _open(self) -> dict:
        if self._arrays is None or self._pid != os.getpid():
            group = zarr.open_group(self.path, mode="r", zarr_format=3)
            arrays = {name: group[name] for name in self._names()}
            for name, a in arrays.items():
                self._check_array(name, a)
            size = sum(a.nbytes for a in arrays.values())
            if size <= self.cache_bytes:
                arrays = {name: self._read(name, a, slice(None)) for name, a in arrays.items()}
            self._arrays, self._pid = arrays, os.getpid()
        return self._arrays

    def _check_array(self, name: str, array: zarr.Array) -> None:
        """Its length is the manifest's; with checksummed chunks, every chunk file exists
        (zarr would read a missing one as zeros)."""
        if array.shape[0] != self.meta.n_cells:
            raise corrupt(self.path / name, "shape", f"{array.shape[0]} rows, expected "
                          f"{self.meta.n_cells} (manifest.json)")  # fmt: skip
        if not any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs):
            return  # written before per-chunk checksums (format version 1)
        for i in range(-(-array.shape[0] // array.chunks[0])):
            key = array.metadata.encode_chunk_key((i, 0) if array.ndim == 2 else (i,))
            if not (self.path / name / key).is_file():
                raise corrupt(self.path / name / key, "chunk", "the chunk file is missing")

    def _read(self, name: str, array, rows: slice) -> np.ndarray:
        """``array[rows]``; zarr verifies the chunks' checksums, a failure names the array."""
        if isinstance(array, np.ndarray):
            return array[rows]
        try:
            return array[rows]
        except Exception as err:  # noqa: BLE001 - a codec failure is a damaged chunk
            raise corrupt(self.path / name, "chunk", f"cannot read ({err})") from err

    def read_unit(self, unit: int) -> CellBlock:
        if not 0 <= unit < len(self.meta.unit_sizes):
            raise IndexError(f"unit {unit} outside [0, {len(self.meta.unit_sizes)})")
        return self.read_rows(int(self._starts[unit]), int(self._starts[unit + 1]))

    def read_rows(self, start: int, stop: int) -> CellBlock:
        check_row_range(start, stop, self.meta.n_cells)
        a, rows = self._open(), slice(start, stop)

        def read(name: str, dtype=None) -> np.ndarray:
            return np.array(self._read(name, a[name], rows), dtype=dtype)

        return CellBlock(
            X=read("z", np.float32),
            rows=np.arange(start, stop, dtype=np.int64),
            library_size=read("library_size", np.float32),
            codes={c: read(f"obs/{c}/codes") for c in self.meta.categories},
            numeric={c: read(f"obs/{c}") for c in self.meta.numeric_columns},
        )

    def group_index(self) -> pd.DataFrame:
        raise NotImplementedError("set sampling reads the count store, not its latents")

    def provenance(self) -> dict:
        return json.loads(json.dumps({k: self.manifest[k] for k in ("source", "encoder")}))
