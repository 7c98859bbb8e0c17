"""The WebDataset store: tar shards of ``<key>.cells.npz`` samples, one block of cells each.

A sample is a block of ``block_cells`` consecutive cells, never one cell: per-sample Python
costs about 170 us (stack-on-cpu notes), which caps one-cell samples at ~5k cells/s. Shards
hold consecutive rows; the loaders shuffle. Shards are written with ``webdataset.TarWriter``
so any WebDataset pipeline can stream them (``wds.WebDataset(urls).decode()`` yields the
npz as a dict of arrays).

Reading: a shard is read whole (it is the read unit). ``tarfile`` lists the members, the
file is read into one buffer, and each sample's npz is parsed in place by ``npz_reader``.
Measured (`latentcell benchmark codecs`, 16k-cell shards, 2000 genes, 10% non-zero): this reader 778k
cells/s; webdataset's ``tariterators.tar_file_iterator`` with the same npz parser 523k and with
``np.load`` 204k. So the reader does not iterate with webdataset; any WebDataset pipeline still
reads the shards (the tests stream one through ``wds.WebDataset``).

Sample npz (``np.savez``, no pickle): data float32, indices int32, indptr int64 (local,
from 0), rows int64, library_size float32, names fixed-width unicode, ``code.<col>`` int32,
``num.<col>`` in the column's dtype.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .atomic import AtomicDir, AtomicWriter
from .blocks import ROLES, CellBlock, StoreSpec
from .errors import DataValidationError
from .integrity import corrupt, crc32c
from .npz_reader import read_npz
from .remote import RemoteRoot, is_url, join
from .safe_paths import check_relative_name, name_problem, resolve_inside
from .store_common import (
    GroupRanges,
    base_manifest,
    category_counts,
    check_block,
    check_group_index,
    check_row_range,
    check_spec,
    manifest_int,
    meta_from_manifest,
    read_manifest,
    write_manifest,
)
from .store_layout import DEFAULT_BLOCK_CELLS, MANIFEST_NAME, SEALED_SINCE

# A shard is the loader's read unit and a pool holds 8 units, so shard size bounds loader
# memory and sets how many random places a pool mixes: 4096 cells keeps pools near Zarr's
# (16k shards gave 943 MB peak RSS at 2000 genes and would be GBs at 18k genes).
DEFAULT_CELLS_PER_SHARD = 4096
SAMPLE_SUFFIX = ".cells.npz"


def encode_sample(block: CellBlock) -> bytes:
    """One block as npz bytes (the ``cells.npz`` member of a sample)."""
    X = block.X
    arrays = {
        "data": X.data.astype(np.float32, copy=False),
        "indices": X.indices.astype(np.int32, copy=False),
        "indptr": X.indptr.astype(np.int64, copy=False),
        "rows": block.rows.astype(np.int64, copy=False),
        "library_size": block.library_size.astype(np.float32, copy=False),
        "names": np.asarray(block.names).astype(str),
    }
    arrays.update({f"code.{k}": v for k, v in block.codes.items()})
    arrays.update({f"num.{k}": v for k, v in block.numeric.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_sample(raw, n_genes: int, names: bool = False) -> CellBlock:
    """The inverse of :func:`encode_sample` (arrays are views into ``raw`` when possible)."""
    z = read_npz(raw)
    if z is None:  # not the plain np.savez layout: let numpy parse it
        with np.load(io.BytesIO(bytes(raw)), allow_pickle=False) as f:
            z = {k: f[k] for k in f.files}
    indptr = z["indptr"]
    X = sp.csr_matrix(
        (z["data"], z["indices"], indptr.astype(np.int32)), shape=(len(indptr) - 1, n_genes)
    )
    return CellBlock(
        X=X,
        rows=z["rows"],
        library_size=z["library_size"],
        codes={k[5:]: v for k, v in z.items() if k.startswith("code.")},
        numeric={k[4:]: v for k, v in z.items() if k.startswith("num.")},
        names=z["names"] if names else None,
    )


class WebDatasetStoreWriter(AtomicWriter):
    """Writes a WebDataset store at ``out`` (``StoreWriter``); see the module docstring.

    first_row, shard_prefix: for one part of a distributed build (``distributed_build``), whose
    shards are moved into the merged store as they are: rows, sample keys, shard first rows
    and group ranges start at ``first_row``, shard names at ``<shard_prefix>shard-``.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        spec: StoreSpec,
        block_cells: int = DEFAULT_BLOCK_CELLS,
        cells_per_shard: int = DEFAULT_CELLS_PER_SHARD,
        overwrite: bool = False,
        first_row: int = 0,
        shard_prefix: str = "",
    ):
        check_spec(spec)
        if block_cells < 1 or cells_per_shard < 1:
            raise ValueError("block_cells and cells_per_shard must be >= 1")
        self.spec, self.block_cells = spec, int(block_cells)
        self.samples_per_shard = max(1, round(cells_per_shard / block_cells))
        self._atomic = AtomicDir(out, overwrite=overwrite)
        self.out = str(self._atomic.out)
        self.n_cells = 0  # rows assigned so far (appended)
        self.nnz = 0
        self.first_row, self.shard_prefix = int(first_row), shard_prefix
        self._written = self.first_row  # rows already in samples
        self._buffer: list[CellBlock] = []
        self._buffered = 0
        self._shards: list[dict] = []
        self._file = None
        self._tar = None
        self._groups = GroupRanges(spec.roles)
        self._cat_counts = {c: np.zeros(len(v), np.int64) for c, v in spec.categories.items()}

    def _append(self, block: CellBlock) -> None:
        block = check_block(block, self.spec)
        n = block.n_cells
        row0 = self.first_row + self.n_cells
        block.rows = np.arange(row0, row0 + n, dtype=np.int64)
        self._groups.add(block.codes, n)
        category_counts(self.spec, self._cat_counts, block.codes)
        self.n_cells += n
        self.nnz += block.X.nnz
        if n:
            self._buffer.append(block)
            self._buffered += n
        if self._buffered >= self.block_cells:
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        if not self._buffer:
            return
        whole = CellBlock.concat(self._buffer)
        k = self.block_cells
        m = whole.n_cells if final else (whole.n_cells // k) * k
        for a in range(0, m, k):
            self._write_sample(whole.slice(a, min(a + k, m)))
        rest = whole.n_cells - m
        self._buffer = [whole.slice(m, whole.n_cells)] if rest else []
        self._buffered = rest

    def _write_sample(self, block: CellBlock) -> None:
        if self._tar is None or self._shards[-1]["n_samples"] >= self.samples_per_shard:
            self._close_shard()
            name = f"{self.shard_prefix}shard-{len(self._shards):06d}.tar"
            # Stays open across appends; closed in _close_shard / abort.
            self._file = open(self._atomic.tmp / name, "wb")  # noqa: SIM115
            import webdataset as wds  # imports torch (about 1 s): only writers need it

            self._tar = wds.TarWriter(self._file, mtime=0, format=tarfile.USTAR_FORMAT)
            self._shards.append(
                {"name": name, "n_cells": 0, "n_samples": 0, "first_row": self._written}
            )
        self._tar.write({"__key__": f"{self._written:012d}", "cells.npz": encode_sample(block)})
        shard = self._shards[-1]
        shard["n_cells"] += block.n_cells
        shard["n_samples"] += 1
        shard["nnz"] = shard.get("nnz", 0) + block.X.nnz
        self._written += block.n_cells

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            shard = self._shards[-1]
            raw = np.fromfile(self._atomic.tmp / shard["name"], dtype=np.uint8)
            shard.update(sha256=hashlib.sha256(raw).hexdigest(), crc32c=crc32c(raw), bytes=len(raw))
            self._tar = self._file = None

    def _finish(self) -> Path:
        """Write the last sample and shard, the manifest, and rename into place."""
        self._emit(final=True)
        self._close_shard()
        groups = self._groups.frame()
        groups[["start", "stop"]] += self.first_row
        counts = (self.n_cells, self.nnz, self._cat_counts)
        manifest = shards_manifest(self.spec, counts, self.block_cells, groups, self._shards)
        write_manifest(self._atomic.tmp, manifest)
        return self._atomic.commit()

    def _discard(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:  # noqa: BLE001 - best effort while discarding the build
                pass
            self._tar = self._file = None
        self._atomic.abort()


def shards_manifest(
    spec: StoreSpec, counts: tuple, block_cells: int, groups: pd.DataFrame, shards: list[dict]
) -> dict:
    """The manifest of a WebDataset store (``counts``: n_cells, nnz, cells per category);
    also what a distributed build writes over its parts' shards."""
    manifest = base_manifest("webdataset", spec, *counts)
    manifest.update(
        block_cells=block_cells,
        n_group_ranges=len(groups),
        groups={c: groups[c].astype(int).tolist() for c in (*ROLES, "start", "stop")},
        shards=shards,
        checksums={s["name"]: s["sha256"] for s in shards},
    )
    return manifest


class WebDatasetStoreReader:
    """Reads a WebDataset store (``StoreReader``); units are shards. Picklable (no handles).

    names: include obs names in the blocks (off by default, as in ZarrStoreReader).
    verify: check each shard's size and checksum when reading it (``integrity``); False
    exists only to measure what the check costs (``latentcell benchmark integrity``).
    """

    def __init__(self, path: str | os.PathLike, names: bool = False, verify: bool = True):
        # a URL (``remote``) stays a string: shards are then fetched through fsspec
        self.path = str(path).rstrip("/") if is_url(path) else Path(path).absolute()
        self._remote = RemoteRoot(self.path) if is_url(self.path) else None
        manifest = read_manifest(self.path)
        if manifest["format"] != "webdataset":
            raise DataValidationError(
                self.path,
                "format",
                f"a {manifest['format']} store, not webdataset",
                "use open_store",
            )
        mpath = join(self.path, MANIFEST_NAME)
        self.shards = _checked_shards(manifest, mpath, self.path)
        sizes = np.array([s["n_cells"] for s in self.shards], dtype=np.int64)
        self.meta = meta_from_manifest(manifest, str(self.path), sizes)
        self.first_rows = np.array([s["first_row"] for s in self.shards], dtype=np.int64)
        self.block_cells = manifest_int(manifest, "block_cells", mpath, minimum=1)
        self.names, self.verify = names, verify

    def shard_path(self, unit: int) -> Path | str:
        return join(self.path, self.shards[unit]["name"])

    def _samples(self, unit: int) -> Iterator[tuple[int, memoryview]]:
        """(first row, npz bytes) of each sample of shard ``unit``, after the shard's size and
        checksum and its members' names and types were checked (``integrity``)."""
        if not 0 <= unit < len(self.shards):
            raise IndexError(f"unit {unit} outside [0, {len(self.shards)})")
        shard, path = self.shards[unit], self.shard_path(unit)
        if self._remote is not None:
            raw = self._fetch(shard["name"], path)
        else:
            raw = self._read_local(path)
        if "crc32c" in shard and self.verify:
            if len(raw) != shard["bytes"]:
                raise corrupt(
                    path, "bytes", f"{len(raw)} bytes, the manifest says {shard['bytes']}"
                )
            if crc32c(raw) != shard["crc32c"]:
                raise corrupt(path, "crc32c", "the shard does not match its checksum")
        members = _sample_members(path, len(raw), raw if self._remote is not None else None)
        for key, start, size in members:
            yield key, memoryview(raw)[start : start + size]

    def _fetch(self, name: str, path: str) -> np.ndarray:
        """A remote shard's bytes (writable, as local reads are)."""
        try:
            data = self._remote.read(name)
        except FileNotFoundError:
            raise corrupt(path, "shard", "the shard file is missing") from None
        raw = np.empty(len(data), np.uint8)
        raw[:] = np.frombuffer(data, np.uint8)
        return raw

    @staticmethod
    def _read_local(path: Path) -> np.ndarray:
        try:
            with open(path, "rb", buffering=0) as f:
                # writable (so are the arrays), no zero-fill: 2x faster than np.fromfile
                raw = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
                if f.readinto(raw) != len(raw):
                    raise corrupt(path, "shard", "the shard changed while it was read")
        except FileNotFoundError:
            raise corrupt(path, "shard", "the shard file is missing") from None
        return raw

    def _blocks(self, unit: int, keep=None) -> Iterator[CellBlock]:
        """Decoded samples of shard ``unit`` (only those whose (first row, cells) pass
        ``keep``). Sample keys are their first rows, so each sample's size is known before
        decoding it: keys must run from the shard's ``first_row`` up to its end in order."""
        path, shard = self.shard_path(unit), self.shards[unit]
        samples = list(self._samples(unit))
        keys = [key for key, _ in samples]
        end = int(shard["first_row"]) + int(shard["n_cells"])
        bounds, nnz = [*keys, end], 0
        if (keys and keys[0] != shard["first_row"]) or (not keys and shard["n_cells"]):
            raise corrupt(
                path, "samples", f"rows start at {keys[:1]}, expected {shard['first_row']}"
            )
        for i, (key, raw) in enumerate(samples):
            n = bounds[i + 1] - key
            member = f"{key:012d}{SAMPLE_SUFFIX}"
            if n <= 0:
                raise corrupt(path, member, f"sample keys out of order or past row {end}")
            if keep is None or keep(key, n):
                block = _decode_checked(raw, self.meta.n_genes, self.names, path, member, key, n)
                nnz += block.X.nnz
                yield block
        if keep is None and "nnz" in shard and nnz != shard["nnz"]:
            raise corrupt(path, "nnz", f"holds {nnz} counts, the manifest says {shard['nnz']}")

    def iter_unit_blocks(self, unit: int) -> Iterator[CellBlock]:
        """The samples of shard ``unit`` as blocks, in row order."""
        return self._blocks(unit)

    def read_unit(self, unit: int) -> CellBlock:
        """The whole shard ``unit`` as one block."""
        return CellBlock.concat(list(self.iter_unit_blocks(unit)))

    def read_units(self, units) -> CellBlock:
        """Whole shards, concatenated in the order given (the cell stream's pools): their
        samples are joined once, not per shard and again per pool."""
        return CellBlock.concat([b for u in units for b in self.iter_unit_blocks(int(u))])

    def read_rows(self, start: int, stop: int) -> CellBlock:
        """Rows [start, stop): decodes only the samples that hold them."""
        check_row_range(start, stop, self.meta.n_cells)
        if start == stop:
            return self._empty()
        first = int(np.searchsorted(self.first_rows, start, side="right")) - 1
        last = int(np.searchsorted(self.first_rows, stop - 1, side="right")) - 1
        parts = []
        for unit in range(first, last + 1):
            for block in self._blocks(unit, keep=lambda r, n: r < stop and r + n > start):
                row0 = int(block.rows[0])
                a, b = max(start - row0, 0), min(stop - row0, block.n_cells)
                parts.append(block.slice(a, b))
        return CellBlock.concat(parts)

    def _empty(self) -> CellBlock:
        m = self.meta
        numeric = m.manifest["obs"]["numeric"]
        return CellBlock(
            X=sp.csr_matrix((0, m.n_genes), dtype=np.float32),
            rows=np.zeros(0, np.int64),
            library_size=np.zeros(0, np.float32),
            codes={c: np.zeros(0, np.int32) for c in m.categories},
            numeric={c: np.zeros(0, numeric[c]) for c in m.numeric_columns},
            names=np.zeros(0, str) if self.names else None,
        )

    def group_index(self) -> pd.DataFrame:
        mpath = join(self.path, MANIFEST_NAME)
        try:
            g = self.meta.manifest["groups"]
            out = {role: np.asarray(g[role], dtype=np.int32) for role in ROLES}
            out.update(start=np.asarray(g["start"], np.int64), stop=np.asarray(g["stop"], np.int64))
            frame = pd.DataFrame(out)
        except (KeyError, TypeError, ValueError) as err:
            raise corrupt(mpath, "groups", f"unreadable group ranges ({err})") from err
        return check_group_index(frame, self.meta, mpath)


_MEMBER = re.compile(r"^(\d{12})" + re.escape(SAMPLE_SUFFIX) + "$")
_SHARD_KEYS = {"name": str, "n_cells": int, "n_samples": int, "first_row": int}


def _checked_shards(manifest: dict, mpath, root: Path | str) -> list[dict]:
    """The manifest's shard list, each entry typed, named inside the store, and placed: shards
    hold consecutive rows from 0, so ``first_row`` is the running total of ``n_cells``."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise corrupt(mpath, "shards", "missing or not a list")
    sealed = manifest["version"] >= SEALED_SINCE
    keys = {**_SHARD_KEYS, **({"crc32c": int, "bytes": int, "nnz": int} if sealed else {})}
    row = 0
    for i, shard in enumerate(shards):
        field = f"shards[{i}]"
        if not isinstance(shard, dict) or any(
            not isinstance(shard.get(k), t) or isinstance(shard.get(k), bool)
            for k, t in keys.items()
        ):
            raise corrupt(mpath, field, f"expected {sorted(keys)} with the right types")
        if is_url(root):  # no symlinks behind a URL: a plain relative name is enough
            check_relative_name(shard["name"], mpath, f"{field}.name")
        else:
            resolve_inside(root, shard["name"], mpath, f"{field}.name")
        if shard["n_cells"] < 0 or shard["first_row"] != row:
            raise corrupt(mpath, field, f"first_row {shard['first_row']}, expected {row}")
        row += shard["n_cells"]
    if sealed and sum(s["nnz"] for s in shards) != manifest.get("nnz"):
        raise corrupt(mpath, "nnz", "differs from the sum of the shards' nnz")
    return shards


def _sample_members(path, size: int, raw=None) -> list[tuple[int, int, int]]:
    """(key, data offset, size) of each sample of a shard, in order. Every member must be a
    regular file named ``<12-digit key>.cells.npz`` (no links, directories, absolute or
    ``..`` names, other files) and each key must appear once: anything else is damage or
    tampering, named by shard and member, never skipped. ``raw``: the shard's bytes, when
    it was fetched from a URL (a local shard is listed from its file)."""
    source = {"fileobj": io.BytesIO(raw)} if raw is not None else {"name": path}
    try:
        with tarfile.open(mode="r:", **source) as tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise corrupt(path, "tar", f"not a readable tar file ({err})") from err
    out, seen = [], set()
    for m in members:
        match = _MEMBER.match(m.name)  # a match is a plain relative name already
        if match is None:
            problem = name_problem(m.name) or f"is not a <12-digit key>{SAMPLE_SUFFIX} sample"
            raise corrupt(path, m.name, problem)
        if not m.isreg():
            raise corrupt(path, m.name, "is not a regular file (a link, directory or device)")
        key = int(match.group(1))
        if key in seen:
            raise corrupt(path, m.name, "a duplicate sample key")
        if m.offset_data + m.size > size:
            raise corrupt(path, m.name, "runs past the end of the shard (truncated)")
        seen.add(key)
        out.append((key, m.offset_data, m.size))
    return out


def _decode_checked(raw, n_genes: int, names: bool, path: Path, member: str, row0: int, n: int):
    """``decode_sample`` whose failures and inconsistent arrays name the shard and member."""
    try:
        block = decode_sample(raw, n_genes, names)
        X = block.X
        # the shard's checksum vouches for the bytes; what the loaders rely on is the size
        ok = X.shape[0] == n == len(block.library_size) and X.indptr[-1] == len(X.data)
    except Exception as err:  # noqa: BLE001 - any parse failure of a sample is damage
        raise corrupt(
            path, member, f"cannot decode the sample ({type(err).__name__}: {err})"
        ) from err
    if not ok:
        raise corrupt(path, member, "the sample's arrays are inconsistent")
    return block
