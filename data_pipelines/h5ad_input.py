"""Read h5ad inputs without loading them: obs/var in memory, X in row blocks straight from HDF5.

The VCC training file is about 15 GB of gzip-compressed CSR, so ``X`` is never materialised.
``H5adFile`` opens the file with h5py (not ``anndata.read_h5ad(backed="r")``, whose backed
sparse matrices re-read ``indptr`` on every slice and cannot coalesce row reads) and serves
  * ``read_range(start, stop)``: one contiguous slice of data/indices per block;
  * ``read_rows(rows)``: any set of rows, in the order given. Requested rows are sorted and
    coalesced into spans whose gaps are at most ``max_gap`` stored entries; each span is read
    with one slice and the rows are gathered from it at once (memory never holds the gaps).
    Papalexi (20,729 cells, gzip) in group order, 1000-cell blocks: per-row slices 0.70 s,
    spans with gap 16384 0.15 s, unbounded windows 0.14 s, sequential 0.06 s.
A chunk cache (``cache_bytes`` per dataset) keeps the dataset handles' gzip chunks; the handles
are kept open because the cache lives in them (reopening per read made reads 8x slower).

The build writes each file sorted by group, so it reads rows in a permuted order
(``iter_ordered``). Direct gathers decompress every chunk a block touches; when the groups are
scattered through a file that the cache cannot hold, each block touches most chunks and the
file is decompressed once per block. ``plan_ordered_read`` counts the chunk decompressions of
direct gathers from ``indptr`` alone and, above two passes' worth, switches to a spill sort: one
sequential pass that validates and aligns blocks and appends them to bucket files of
consecutive output positions (next to the output), then each bucket is sorted in memory. On a
50,000 x 8,000 gzip file (50M entries, groups scattered): direct 27.8 s, spill 6.9 s.

Layouts: CSR (fast), dense (row slices), CSC (correct but slow: every read scans all stored
entries, so a warning suggests converting). ``open_input`` adds the structural validation:
every problem is a one-line DataValidationError naming file, field and fix.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError, LatentcellWarning
from latentcell.data_pipelines.schemas import Roles, Schema, resolve_roles
from latentcell.data_pipelines.vocabulary import GeneTable, input_genes

DEFAULT_CACHE_BYTES = 64 << 20  # HDF5 chunk cache per dataset
DEFAULT_MAX_GAP = 16384  # stored entries (CSR) or rows (dense) worth reading through
MAX_SPAN = 1 << 23  # stored entries read by one HDF5 call at most (64 MiB of data + indices)
DEFAULT_BUCKET_NNZ = 1 << 25  # input entries per in-memory bucket when spill-sorting
CSC_SLAB = 1 << 22  # entries per read while scanning a CSC matrix
_CACHE_SLOTS = 200_003  # prime, ~100x the chunks that fit in the cache


def _h5_open(path: str, cache_bytes: int) -> h5py.File:
    """Open read-only with a large chunk cache, mapping every failure to a validation error."""
    file = Path(path)
    if not file.exists():
        raise DataValidationError(path, "file", "file not found", "check the input path")
    if file.is_dir() or not h5py.is_hdf5(path):
        raise DataValidationError(
            path,
            "file",
            "not an h5ad file (not HDF5)",
            "pass an .h5ad written by anndata (adata.write_h5ad); zarr-backed AnnData is not read",
        )
    try:
        return h5py.File(path, "r", rdcc_nbytes=cache_bytes, rdcc_nslots=_CACHE_SLOTS)
    except OSError as exc:
        raise DataValidationError(
            path, "file", f"cannot open HDF5 file ({exc})", "check the file is complete"
        ) from exc


def _read_frame(h5: h5py.File, key: str, path: str) -> pd.DataFrame:
    from anndata.io import read_elem

    try:
        frame = read_elem(h5[key])
    except Exception as exc:  # any decoding failure is a bad input, reported in one line
        raise DataValidationError(
            path, key, f"cannot decode ({type(exc).__name__}: {exc})", "re-write with anndata"
        ) from exc
    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError(path, key, "is not a dataframe", "re-write the file with anndata")
    return frame


def _x_encoding(x, path: str) -> tuple[str, tuple[int, int]]:
    """("csr" | "csc" | "dense", shape) of the X element."""
    if isinstance(x, h5py.Dataset):
        if x.ndim != 2:
            raise DataValidationError(path, "X", f"has {x.ndim} dimensions", "store a 2-D matrix")
        return "dense", tuple(int(s) for s in x.shape)
    enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    kind = {"csr_matrix": "csr", "csc_matrix": "csc", "csr": "csr", "csc": "csc"}.get(enc)
    shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
    if kind is None or shape is None or not {"data", "indices", "indptr"} <= set(x):
        raise DataValidationError(
            path, "X", f"unsupported X encoding {enc!r}", "store X as CSR, CSC or dense"
        )
    return kind, (int(shape[0]), int(shape[1]))


def coalesce(
    starts: np.ndarray, stops: np.ndarray, max_gap: int, max_span: int | None = None
) -> list[tuple[int, int]]:
    """Index ranges of items (sorted by start) merged into spans with gaps <= ``max_gap``.

    A span also ends before it would exceed ``max_span`` (bounds the memory of one read; a
    single item longer than that is still one span). Returns (first_item, last_item + 1) pairs.
    """
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(starts[1:] - stops[:-1] > max_gap) + 1
    edges = np.concatenate([[0], breaks, [len(starts)]]).tolist()
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    if max_span is None:
        return spans
    return [piece for a, b in spans for piece in _split_span(starts, stops, a, b, max_span)]


def _split_span(starts, stops, a: int, b: int, max_span: int) -> list[tuple[int, int]]:
    if stops[b - 1] - starts[a] <= max_span:
        return [(a, b)]
    pieces = []
    while a < b:
        end = int(np.searchsorted(stops[a:b], starts[a] + max_span, side="right")) + a
        end = max(end, a + 1)
        pieces.append((a, end))
        a = end
    return pieces


class H5adFile:
    """An open h5ad: ``obs``/``var`` DataFrames, ``obs_names``, and row access to ``X``."""

    def __init__(
        self, path: str, cache_bytes: int = DEFAULT_CACHE_BYTES, max_gap: int = DEFAULT_MAX_GAP
    ):
        self.path = str(path)
        self.max_gap = max_gap
        self.cache_bytes = cache_bytes
        self._h5 = _h5_open(self.path, cache_bytes)
        try:
            self._load_structure()
        except BaseException:
            self._h5.close()
            raise

    def _load_structure(self) -> None:
        missing = [k for k in ("X", "obs", "var") if k not in self._h5]
        if missing:
            raise DataValidationError(
                self.path,
                "/".join(missing),
                "not an h5ad file (HDF5 without " + ", ".join(missing) + ")",
                "pass an .h5ad written by anndata with counts in X",
            )
        self.obs = _read_frame(self._h5, "obs", self.path)
        self.var = _read_frame(self._h5, "var", self.path)
        self.encoding, self.shape = _x_encoding(self._h5["X"], self.path)
        self.obs_names = self.obs.index.astype(str).to_numpy()
        self._bind_x()
        if self.encoding == "csc":
            warnings.warn(
                f"{self.path}: X is CSC; every row read scans the whole matrix. "
                "Convert to CSR (adata.X = adata.X.tocsr()) for a fast build.",
                LatentcellWarning,
                stacklevel=3,
            )

    def _bind_x(self) -> None:
        """Dataset handles and CSR row pointers of the open file.

        The handles are kept because HDF5's chunk cache lives in the open dataset: reopening
        ``X/data`` per read would decompress every chunk again (measured: 8x slower).
        """
        self._x = self._h5["X"]
        if self.encoding != "dense":
            self._data, self._indices = self._x["data"], self._x["indices"]
        if self.encoding == "csr":
            self._indptr = self._x["indptr"][:].astype(np.int64)
            self._check_pointers(self._indptr, self.n_cells)
        elif self.encoding == "csc":
            self._check_pointers(self._x["indptr"][:].astype(np.int64), self.n_genes)

    def _check_pointers(self, indptr: np.ndarray, n: int) -> None:
        """A sparse X's pointer array: one entry per row (column for CSC) plus one, from 0,
        never decreasing, ending at the number of stored entries. Checked once at open, so
        no read can slice outside ``data``/``indices``."""
        nnz = len(self._data)
        problem = None
        if len(self._indices) != nnz:
            problem = f"X/data has {nnz} entries but X/indices has {len(self._indices)}"
        elif len(indptr) != n + 1:
            problem = f"X/indptr has {len(indptr)} entries, expected {n + 1}"
        elif indptr[0] != 0 or indptr[-1] != nnz:
            problem = f"X/indptr runs from {indptr[0]} to {indptr[-1]}, expected 0 to {nnz}"
        elif (np.diff(indptr) < 0).any():
            row = int(np.flatnonzero(np.diff(indptr) < 0)[0])
            problem = f"X/indptr decreases at position {row}"
        if problem:
            raise DataValidationError(
                self.path, "X/indptr", f"malformed sparse matrix: {problem}",
                "re-write the file with anndata (adata.write_h5ad) from a valid matrix",
            )  # fmt: skip

    def _checked_indices(self, indices: np.ndarray, limit: int) -> np.ndarray:
        """Stored column (row, for CSC) indices must lie in [0, limit)."""
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= limit):
            bad = indices[(indices < 0) | (indices >= limit)][0]
            raise DataValidationError(
                self.path, "X/indices", f"index {int(bad)} outside [0, {limit})",
                "re-write the file with anndata (adata.write_h5ad) from a valid matrix",
            )  # fmt: skip
        return indices

    def release(self) -> None:
        """Close the HDF5 handle (keeping obs/var); the next read reopens it.

        Lets a build validate thousands of inputs without holding thousands of open files.
        """
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self._x = self._data = self._indices = self._indptr = None

    def _ensure_open(self) -> None:
        if self._h5 is None:
            self._h5 = _h5_open(self.path, self.cache_bytes)
            self._bind_x()

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        return self.shape[1]

    @property
    def x_dtype(self) -> np.dtype:
        self._ensure_open()
        return self._x.dtype if self.encoding == "dense" else self._data.dtype

    def close(self) -> None:
        self.release()

    def __enter__(self) -> H5adFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ reads

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as CSR (the input's dtype)."""
        self._ensure_open()
        if self.encoding == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            indptr = self._indptr[start : stop + 1] - lo
            data = self._data[lo:hi]
            indices = self._checked_indices(self._indices[lo:hi], self.n_genes)
            return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_genes))
        if self.encoding == "dense":
            return sp.csr_matrix(self._x[start:stop])
        return self._read_csc(np.arange(start, stop))

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows ``rows`` (any order, repeats allowed) as CSR, in that order."""
        self._ensure_open()
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) and (uniq[0] < 0 or uniq[-1] >= self.n_cells):
            raise IndexError(f"{self.path}: rows outside [0, {self.n_cells})")
        if self.encoding == "csr":
            block = self._read_sorted_csr(uniq)
        elif self.encoding == "dense":
            block = self._read_sorted_dense(uniq)
        else:
            block = self._read_csc(uniq)
        is_sorted_unique = len(uniq) == len(rows) and np.array_equal(inverse, np.arange(len(rows)))
        return block if is_sorted_unique else block[inverse]

    def _read_sorted_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows (sorted, unique) by coalesced spans; each span is gathered as soon as it is
        read, so memory holds the requested entries plus one span, never the gaps."""
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        lengths = stops - starts
        data, indices = [], []
        for a, b in coalesce(starts, stops, self.max_gap, MAX_SPAN):
            lo, hi = int(starts[a]), int(stops[b - 1])
            take = _ranges_to_index(starts[a:b] - lo, lengths[a:b])
            data.append(self._data[lo:hi][take])
            indices.append(self._checked_indices(self._indices[lo:hi][take], self.n_genes))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        shape = (len(rows), self.n_genes)
        if not data:
            return sp.csr_matrix(shape, dtype=self.x_dtype)
        return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=shape)

    def _read_sorted_dense(self, rows: np.ndarray) -> sp.csr_matrix:
        parts = []
        for a, b in coalesce(rows, rows + 1, self.max_gap // max(self.n_genes, 1)):
            window = self._x[int(rows[a]) : int(rows[b - 1]) + 1]
            parts.append(sp.csr_matrix(window[rows[a:b] - rows[a]]))
        if not parts:
            return sp.csr_matrix((0, self.n_genes), dtype=self.x_dtype)
        return sp.vstack(parts, format="csr")

    def _read_csc(self, rows: np.ndarray) -> sp.csr_matrix:
        """Scan all stored entries in slabs and keep those of ``rows`` (sorted, unique)."""
        position = np.full(self.n_cells, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        colptr = self._x["indptr"][:].astype(np.int64)  # per call: CSC reads are rare
        nnz = int(colptr[-1])
        keep_r, keep_c, keep_v = [], [], []
        for lo in range(0, nnz, CSC_SLAB):
            hi = min(lo + CSC_SLAB, nnz)
            pos = position[self._checked_indices(self._indices[lo:hi], self.n_cells)]
            hit = np.flatnonzero(pos >= 0)
            if len(hit):
                keep_r.append(pos[hit])
                keep_c.append(np.searchsorted(colptr, lo + hit, side="right") - 1)
                keep_v.append(self._data[lo:hi][hit])
        if not keep_r:
            return sp.csr_matrix((len(rows), self.n_genes), dtype=self.x_dtype)
        coo = sp.coo_matrix(
            (np.concatenate(keep_v), (np.concatenate(keep_r), np.concatenate(keep_c))),
            shape=(len(rows), self.n_genes),
        )
        return coo.tocsr()

    def iter_blocks(
        self, block_cells: int, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """(row ids, CSR) blocks: all rows in file order, or ``rows`` in the order given."""
        if rows is None:
            for start in range(0, self.n_cells, block_cells):
                stop = min(start + block_cells, self.n_cells)
                yield np.arange(start, stop), self.read_range(start, stop)
            return
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), block_cells):
            chunk = rows[start : start + block_cells]
            yield chunk, self.read_rows(chunk)


# ---------------------------------------------------------------- reading in a given order


@dataclass(frozen=True)
class OrderedReadPlan:
    """How to read a file's rows in a permuted order: ``direct`` gathers or a ``spill`` sort.

    chunk_reads: estimated HDF5 chunk decompressions of direct gathers (over data/indices);
    n_chunks: chunks in the file. Direct gathers decompress every chunk that a block touches;
    when the order scatters each block over the whole file and the chunk cache cannot hold
    the file, that is many full decompressions, and one sequential pass that spills rows to
    order-range buckets on disk (then sorts each bucket in memory) is far cheaper.
    """

    mode: str
    chunk_reads: int
    n_chunks: int


def plan_ordered_read(file: H5adFile, order: np.ndarray, block_cells: int) -> OrderedReadPlan:
    """``direct`` unless direct gathers would decompress the file more than twice over."""
    file._ensure_open()
    if file.encoding != "csr" or file._data.chunks is None or file._data.compression is None:
        return OrderedReadPlan("direct", 0, 0)  # nothing to decompress, or not worth it
    chunk_len = int(file._data.chunks[0])
    nnz = int(file._indptr[-1])
    n_chunks = -(-nnz // chunk_len)
    cached_chunks = file.cache_bytes // (chunk_len * file._data.dtype.itemsize)
    if n_chunks <= cached_chunks:  # the whole file stays in the cache: one pass of work
        return OrderedReadPlan("direct", n_chunks, n_chunks)
    reads = sum(
        _chunks_touched(file._indptr, np.sort(order[i : i + block_cells]), chunk_len)
        for i in range(0, len(order), block_cells)
    )
    return OrderedReadPlan("direct" if reads <= 2 * n_chunks else "spill", reads, n_chunks)


def _chunks_touched(indptr: np.ndarray, rows: np.ndarray, chunk_len: int) -> int:
    """Distinct chunks holding the entries of ``rows`` (sorted): a union of chunk intervals."""
    lo, hi = indptr[rows], indptr[rows + 1]
    keep = hi > lo
    first, last = lo[keep] // chunk_len, (hi[keep] - 1) // chunk_len
    if len(first) == 0:
        return 0
    covered = np.concatenate([[-1], np.maximum.accumulate(last)[:-1]])
    return int(np.maximum(last - np.maximum(first, covered + 1) + 1, 0).sum())


Transform = Callable[[np.ndarray, sp.csr_matrix], sp.csr_matrix]


def iter_ordered(
    file: H5adFile,
    order: np.ndarray,
    block_cells: int,
    transform: Transform,
    plan: OrderedReadPlan,
    spill_dir: str | os.PathLike,
    bucket_nnz: int = DEFAULT_BUCKET_NNZ,
) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """(input rows, ``transform(rows, X)``) blocks covering ``order`` exactly, in that order.

    ``transform`` (validation, gene alignment) sees every block once, in read order; in
    spill mode it runs before spilling, so the spill holds only the stored genes.
    """
    if plan.mode == "direct":
        for rows, X in file.iter_blocks(block_cells, order):
            yield rows, transform(rows, X)
        return
    yield from _spill_sorted(file, order, block_cells, transform, spill_dir, bucket_nnz)


def _spill_sorted(file, order, block_cells, transform, spill_dir, bucket_nnz):
    """Pass 1: read sequentially, append rows to buckets of consecutive order positions.
    Pass 2: per bucket (at most ``bucket_nnz`` input entries), sort by position and yield."""
    file._ensure_open()
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    entries = np.diff(file._indptr)[order]
    bucket_of = (np.cumsum(entries) - entries) // max(bucket_nnz, 1)  # by position
    with tempfile.TemporaryDirectory(dir=spill_dir, prefix=".latentcell-spill-") as tmp:
        spill = _Spill(Path(tmp))
        for rows, X in file.iter_blocks(block_cells):
            Y = transform(rows, X)
            pos = position[rows]
            buckets = bucket_of[pos]
            for k in np.unique(buckets):
                sel = np.flatnonzero(buckets == k)
                spill.write(int(k), pos[sel], Y[sel])
        for k in spill.buckets():
            pos, Y = spill.read(k)
            sort = np.argsort(pos, kind="stable")
            pos, Y = pos[sort], Y[sort]
            for i in range(0, len(pos), block_cells):
                yield order[pos[i : i + block_cells]], Y[i : i + block_cells]


class _Spill:
    """Bucket files of (positions, CSR pieces) as consecutive .npy records."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._written: set[int] = set()

    def _path(self, k: int) -> Path:
        return self.directory / f"bucket-{k:06d}.npy"

    def write(self, k: int, pos: np.ndarray, X: sp.csr_matrix) -> None:
        with open(self._path(k), "ab") as f:
            for array in (np.array([X.shape[1]]), pos, X.indptr, X.indices, X.data):
                np.save(f, array, allow_pickle=False)
        self._written.add(k)

    def buckets(self) -> list[int]:
        return sorted(self._written)

    def read(self, k: int) -> tuple[np.ndarray, sp.csr_matrix]:
        path = self._path(k)
        size, positions, pieces = path.stat().st_size, [], []
        with open(path, "rb") as f:
            while f.tell() < size:
                n_cols, pos, indptr, indices, data = (np.load(f) for _ in range(5))
                shape = (len(pos), int(n_cols[0]))
                pieces.append(sp.csr_matrix((data, indices, indptr), shape=shape))
                positions.append(pos)
        path.unlink()  # free the disk as soon as the bucket is in memory
        return np.concatenate(positions), sp.vstack(pieces, format="csr")


def _ranges_to_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


# ---------------------------------------------------------------- validated inputs


@dataclass
class InputFile:
    """An input that passed structural validation: its file, roles and genes."""

    file: H5adFile
    roles: Roles
    genes: GeneTable

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def n_cells(self) -> int:
        return self.file.n_cells

    def close(self) -> None:
        self.file.close()


def open_input(path: str, schema: Schema, cache_bytes: int = DEFAULT_CACHE_BYTES) -> InputFile:
    """Open ``path`` and check its structure: shape, genes, required columns, control cells."""
    file = H5adFile(path, cache_bytes=cache_bytes)
    try:
        check_shape(file)
        genes = input_genes(file.var, schema, file.path)
        roles = resolve_roles(schema, file.obs, file.path)
    except BaseException:
        file.close()
        raise
    return InputFile(file=file, roles=roles, genes=genes)


def check_shape(file: H5adFile) -> None:
    """X must have cells and genes, and agree with obs and var."""
    n_cells, n_genes = file.shape
    if n_cells == 0 or n_genes == 0:
        raise DataValidationError(
            file.path, "X", f"empty matrix ({n_cells} cells x {n_genes} genes)", "drop this input"
        )
    for field, frame, n in (("obs", file.obs, n_cells), ("var", file.var, n_genes)):
        if len(frame) != n:
            raise DataValidationError(
                file.path,
                field,
                f"has {len(frame)} rows but X has {n}",
                "re-write the file with anndata",
            )
