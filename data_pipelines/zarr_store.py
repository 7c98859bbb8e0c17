"""The Zarr v3 store: cell-chunked CSR counts plus obs, var and group ranges (``store_layout``).

Writing goes through zarr; blocks arrive in arbitrary sizes, so each array is fed through an
append buffer that only ever writes whole chunks (the last, partial chunk once at the end):
no chunk is written twice, so zarr never reads a chunk back to merge a partial write.
Arrays grow by ``resize`` because the number of cells and non-zeros is unknown until the end.

Reading bypasses zarr's synchronous API on the hot path (see ``zarr_chunks`` for why and
what is measured) and keeps the small per-cell columns (``X/indptr``, library size, obs codes
and numeric columns) in memory when the store is modest, so reading one cell chunk costs two
chunk-file reads plus decompression (``X/data``, ``X/indices``) and, optionally, the names.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .atomic import AtomicDir, AtomicWriter, sha256_tree
from .blocks import ROLES, CellBlock, StoreSpec
from .errors import CorruptDataError, DataValidationError
from .integrity import corrupt
from .remote import RemoteRoot, is_url, join, remote_error
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
from .store_layout import DEFAULT_CHUNK_CELLS, FORMAT_VERSION, MANIFEST_NAME, NAMES_COLUMN
from .zarr_chunks import chunk_reader


def _lz4():
    from zarr.codecs import LZ4

    with warnings.catch_warnings():  # "numcodecs codecs are not in the Zarr v3 spec"
        warnings.simplefilter("ignore")
        return LZ4()


# Codec presets (compressor of every numeric array). The default is chosen by measurement:
# see `latentcell benchmark codecs`'s docstring for the table.
CODECS = {
    "none": lambda: None,
    "zstd-1": lambda: ZstdCodec(level=1),
    "zstd-3": lambda: ZstdCodec(level=3),
    "lz4": _lz4,
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
}
DEFAULT_CODEC = "blosc-lz4"
# X/data and X/indices chunks hold about 1/NNZ_SPLIT of an average cell chunk's non-zeros:
# a cell chunk's range then decodes at most ~2/NNZ_SPLIT more than it needs.
NNZ_SPLIT = 4
# Write to zarr in batches of at least this many elements (fewer, larger zarr calls).
_FLUSH_ELEMENTS = 1 << 18
# Keep per-cell columns in memory when they take at most this many bytes.
DEFAULT_CACHE_BYTES = 256 << 20


def _auto_nnz_chunk(nnz: int, n_cells: int, chunk_cells: int) -> int:
    if nnz == 0 or n_cells == 0:
        return 1 << 16
    per_chunk = nnz / n_cells * chunk_cells / NNZ_SPLIT
    return int(min(max(1 << int(np.ceil(np.log2(max(per_chunk, 1)))), 1 << 12), 1 << 22))


class _Appender:
    """Buffers values for one 1-D array and writes them in whole chunks."""

    def __init__(self, array: zarr.Array, chunk: int):
        self.array, self.chunk = array, chunk
        self.flush_at = chunk * max(1, _FLUSH_ELEMENTS // chunk)
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, values: np.ndarray) -> None:
        if len(values):
            self.parts.append(values)
            self.buffered += len(values)
        if self.buffered >= self.flush_at:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        m = self.buffered if final else (self.buffered // self.chunk) * self.chunk
        if m == 0:
            return
        values = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        self.array.resize((self.written + m,))
        self.array[self.written : self.written + m] = values[:m]
        self.written += m
        rest = values[m:]
        self.parts = [rest] if len(rest) else []
        self.buffered = len(rest)


class ZarrStoreWriter(AtomicWriter):
    """Writes a Zarr v3 store at ``out`` (``StoreWriter``); see the module docstring.

    chunk_cells: cells per chunk of every per-cell array (the read unit).
    codec: a key of ``CODECS``. nnz_chunk: entries per ``X/data`` chunk (None: from the
    density of the first chunk of cells). index_dtype: ``X/indices`` dtype ("int32", or
    "uint16" when n_genes <= 65536, which halves the index bytes; readers return int32).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        spec: StoreSpec,
        chunk_cells: int = DEFAULT_CHUNK_CELLS,
        overwrite: bool = False,
        codec: str = DEFAULT_CODEC,
        nnz_chunk: int | None = None,
        index_dtype: str = "int32",
    ):
        check_spec(spec)
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
        if np.dtype(index_dtype) not in (np.dtype("int32"), np.dtype("uint16")):
            raise ValueError("index_dtype must be int32 or uint16")
        if np.dtype(index_dtype) == np.uint16 and len(spec.var) > 1 << 16:
            raise ValueError("index_dtype uint16 needs at most 65536 genes")
        if chunk_cells < 1:
            raise ValueError("chunk_cells must be >= 1")
        self.spec, self.chunk_cells, self.codec = spec, int(chunk_cells), codec
        self.index_dtype = str(np.dtype(index_dtype))
        self.nnz_chunk = nnz_chunk
        self._atomic = AtomicDir(out, overwrite=overwrite)
        self.out = str(self._atomic.out)
        self.n_cells = 0
        self.nnz = 0
        self._pending_x: list[tuple[np.ndarray, np.ndarray]] = []
        self._groups = GroupRanges(spec.roles)
        self._cat_counts = {c: np.zeros(len(v), np.int64) for c, v in spec.categories.items()}
        try:
            self._create()
        except BaseException:
            self._atomic.abort()
            raise

    # -- layout ------------------------------------------------------------------------
    def _array(self, name: str, shape: int, chunk: int, dtype) -> zarr.Array:
        """A 1-D array; strings get zstd (zarr's default), numbers the store's codec; every
        chain ends with the crc32c checksum and every chunk is written (``integrity``)."""
        is_str = dtype is str
        compressor = ZstdCodec() if is_str else CODECS[self.codec]()
        arr = self.root.create_array(
            name,
            shape=(shape,),
            chunks=(chunk,),
            dtype=dtype,
            fill_value="" if is_str else 0,
            compressors=[c for c in (compressor, Crc32cCodec()) if c is not None],
            config={"write_empty_chunks": True},
        )
        self._array_names.append(name)
        return arr

    def _create(self) -> None:
        self.root = zarr.open_group(self._atomic.tmp, mode="w", zarr_format=3)
        self.root.attrs["latentcell"] = {"format": "zarr", "version": FORMAT_VERSION}
        self._array_names: list[str] = []
        c = self.chunk_cells
        self._cells: dict[str, _Appender] = {}
        self._cells["X/indptr"] = _Appender(self._array("X/indptr", 0, c, np.int64), c)
        self._cells["X/indptr"].append(np.zeros(1, np.int64))
        self._cells["library_size"] = _Appender(self._array("library_size", 0, c, np.float32), c)
        for col, cats in self.spec.categories.items():
            arr = self._array(f"obs/{col}/codes", 0, c, np.int32)
            arr.attrs["categories"] = [str(x) for x in cats]
            self._cells[f"obs/{col}/codes"] = _Appender(arr, c)
        for col, dt in self.spec.numeric_dtypes.items():
            self._cells[f"obs/{col}"] = _Appender(self._array(f"obs/{col}", 0, c, np.dtype(dt)), c)
        self._cells[f"obs/{NAMES_COLUMN}"] = _Appender(
            self._array(f"obs/{NAMES_COLUMN}", 0, c, str), c
        )
        var = self.spec.var
        n_genes = len(var)
        for name, values in (
            ("gene_key", var.index),
            ("gene_id", var["gene_id"]),
            ("gene_symbol", var["gene_symbol"]),
        ):
            arr = self._array(f"var/{name}", n_genes, max(n_genes, 1), str)
            if n_genes:
                arr[:] = np.asarray([str(v) for v in values], dtype=str)
        self._x: dict[str, _Appender] | None = None

    def _create_x(self) -> None:
        if self.nnz_chunk is None:
            self.nnz_chunk = _auto_nnz_chunk(self.nnz, self.n_cells, self.chunk_cells)
        k = int(self.nnz_chunk)
        self._x = {
            "X/data": _Appender(self._array("X/data", 0, k, np.float32), k),
            "X/indices": _Appender(self._array("X/indices", 0, k, np.dtype(self.index_dtype)), k),
        }
        for data, indices in self._pending_x:
            self._append_x(data, indices)
        self._pending_x = []

    def _append_x(self, data: np.ndarray, indices: np.ndarray) -> None:
        self._x["X/data"].append(data)
        self._x["X/indices"].append(indices.astype(self.index_dtype, copy=False))

    # -- StoreWriter ---------------------------------------------------------------------
    def _append(self, block: CellBlock) -> None:
        block = check_block(block, self.spec)
        n = block.n_cells
        X = block.X
        self._cells["X/indptr"].append(X.indptr[1:].astype(np.int64) + self.nnz)
        self._cells["library_size"].append(block.library_size)
        for col in self.spec.categories:
            self._cells[f"obs/{col}/codes"].append(block.codes[col])
        for col in self.spec.numeric_dtypes:
            self._cells[f"obs/{col}"].append(block.numeric[col])
        self._cells[f"obs/{NAMES_COLUMN}"].append(np.asarray(block.names).astype(str))
        self._groups.add(block.codes, n)
        category_counts(self.spec, self._cat_counts, block.codes)
        self.n_cells += n
        self.nnz += X.nnz
        if self._x is not None:
            self._append_x(X.data, X.indices)
        else:
            self._pending_x.append((X.data, X.indices))
            if self.n_cells >= self.chunk_cells:
                self._create_x()

    def presize(self, n_cells: int, nnz: int, nnz_chunk: int) -> None:
        """Give every per-cell and X array its final length, for a distributed build whose
        workers write whole chunk ranges straight into ``scratch`` (``distributed_build``)
        instead of appending; publish with ``finish_presized``."""
        self.nnz_chunk, self._pending_x = int(nnz_chunk), []
        self._create_x()
        lengths = {"X/indptr": n_cells + 1, "X/data": nnz, "X/indices": nnz}
        for name, app in (*self._cells.items(), *self._x.items()):
            app.parts, app.buffered = [], 0
            app.array.resize((lengths.get(name, n_cells),))
        self.n_cells, self.nnz = int(n_cells), int(nnz)
        self._presized_groups: pd.DataFrame | None = None

    def finish_presized(self, groups: pd.DataFrame, cat_counts: dict) -> str:
        """Publish a presized store once every chunk is written: the group ranges and cells per
        category (merged from the parts), checksums, manifest, rename."""
        self._presized_groups, self._cat_counts = groups, cat_counts
        return self.finish()

    def _finish(self) -> Path:
        """Flush, write groups/ and manifest.json, rename into place; returns the path."""
        if hasattr(self, "_presized_groups"):  # the arrays were filled by ``presize``'s workers
            groups = self._presized_groups
        else:
            if self._x is None:
                self._create_x()
            for app in (*self._cells.values(), *self._x.values()):
                app.flush(final=True)
            groups = self._groups.frame()
        for col in (*ROLES, "start", "stop"):
            values = groups[col].to_numpy()
            arr = self._array(f"groups/{col}", len(values), max(len(values), 1), values.dtype)
            if len(values):
                arr[:] = values
        self._write_crc_tables()
        tmp = self._atomic.tmp
        manifest = base_manifest("zarr", self.spec, self.n_cells, self.nnz, self._cat_counts)
        manifest.update(
            chunk_cells=self.chunk_cells,
            nnz_chunk=int(self.nnz_chunk),
            codec=self.codec,
            index_dtype=self.index_dtype,
            n_group_ranges=len(groups),
            checksums={name: sha256_tree(tmp / name) for name in sorted(self._array_names)},
        )
        write_manifest(tmp, manifest)
        return self._atomic.commit()

    def _write_crc_tables(self) -> None:
        """``crc32c/<array>``: each chunk's checksum by position. A chunk's own checksum
        proves its bytes are intact; the table proves it is the chunk written at that
        position (not one moved or copied from elsewhere). Read from the chunk files'
        trailers once the data is final."""
        for name in list(self._array_names):
            array = self.root[name]
            n_chunks = -(-array.shape[0] // array.chunks[0])
            table = np.empty(n_chunks, np.uint32)
            for i in range(n_chunks):
                with open(
                    self._atomic.tmp / name / array.metadata.encode_chunk_key((i,)), "rb"
                ) as f:
                    f.seek(-4, os.SEEK_END)
                    table[i] = np.frombuffer(f.read(4), "<u4")[0]
            out = self._array(
                crc_table_name(name), n_chunks, max(min(n_chunks, 1 << 20), 1), np.uint32
            )
            if n_chunks:
                out[:] = table

    def _discard(self) -> None:
        self._atomic.abort()


CRC_TABLES = "crc32c"


def crc_table_name(array: str) -> str:
    """Where the per-position chunk checksums of ``array`` live (``_write_crc_tables``)."""
    return f"{CRC_TABLES}/{array}"


class _ZarrRange:
    """Fallback range reader through zarr itself (codec chains zarr_chunks does not decode);
    zarr verifies a crc32c codec itself, and any failure names the array."""

    def __init__(self, array: zarr.Array, path: Path):
        self.array, self.path = array, path
        self.n = int(array.shape[0])

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        try:
            values = self.array[start:stop]
        except Exception as err:  # noqa: BLE001 - a codec or file failure is a damaged array
            raise corrupt(self.path, "chunk", f"cannot read ({type(err).__name__}: {err})") from err
        if out is not None:
            out[:] = values
            return out
        return values.astype(object) if values.dtype.kind == "T" else values


class _Opened:
    """Per-process handles and caches (never pickled; see ZarrStoreReader.__getstate__)."""

    def _table(self, name: str) -> np.ndarray | None:
        """The array's chunk checksums by position (None for stores without tables: v1)."""
        table = crc_table_name(name)
        if table not in self.group:
            return None
        return _ZarrRange(self.group[table], join(self.path, table)).read(0, None)

    def __init__(self, path: Path | str, meta, cache_bytes: int, direct: bool, verify: bool):
        self.pid, self.path = os.getpid(), path
        self.remote = RemoteRoot(path) if is_url(path) else None
        self.group = _open_group(path, self.remote)
        per_cell = ["X/indptr", "library_size"]
        per_cell += [f"obs/{c}/codes" for c in meta.categories]
        per_cell += [f"obs/{c}" for c in meta.numeric_columns]
        self.readers = {}
        for name in [*per_cell, "X/data", "X/indices", f"obs/{NAMES_COLUMN}"]:
            arr = self.group[name]
            table = self._table(name)
            fast = chunk_reader(arr, path, verify, table, self.remote) if direct else None
            self.readers[name] = fast or _ZarrRange(arr, join(path, name))
        row_bytes = 12 + 4 * len(meta.categories) + 8 * len(meta.numeric_columns)
        self.cached = meta.n_cells * row_bytes <= cache_bytes
        self.cache = {}
        if self.cached:
            try:
                self.cache = {n: self.readers[n].read(0, self.readers[n].n) for n in per_cell}
            except CorruptDataError:  # read by range instead: only the damaged unit fails
                self.cached, self.cache = False, {}


_OPEN_LOCK = threading.Lock()


class ZarrStoreReader:
    """Reads a Zarr v3 store (``StoreReader``); picklable, reopens lazily in each process.

    names: include obs names in the blocks (off by default: decoding them costs about 15% of
    a chunk read and no training batch uses them; round trips and exports turn them on). cache_bytes: keep the per-cell columns in
    memory when they fit in this many bytes (read once per process, then sliced).
    direct: read chunk files directly (``zarr_chunks``); False reads through zarr's API
    (slower; for comparison and for layouts the direct path does not decode, which fall back
    to zarr anyway). verify: check each chunk's checksum (``integrity``); False exists only
    to measure what the check costs (``latentcell benchmark integrity``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        names: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        direct: bool = True,
        verify: bool = True,
    ):
        self.path = str(path).rstrip("/") if is_url(path) else Path(path).absolute()
        manifest = read_manifest(self.path)
        if manifest["format"] != "zarr":
            raise DataValidationError(
                self.path, "format", f"a {manifest['format']} store, not zarr", "use open_store"
            )
        mpath = join(self.path, MANIFEST_NAME)
        n = manifest_int(manifest, "n_cells", mpath)
        c = manifest_int(manifest, "chunk_cells", mpath, minimum=1)
        sizes = np.full(-(-n // c), c, dtype=np.int64)
        if n % c:
            sizes[-1] = n % c
        self.meta = meta_from_manifest(manifest, str(self.path), sizes)
        self.chunk_cells = c
        _check_arrays(self.path, self.meta)
        self.names = names
        self.cache_bytes = cache_bytes
        self.direct = direct
        self.verify = verify
        self._opened: _Opened | None = None
        self._groups: pd.DataFrame | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_opened"] = None
        return state

    def _o(self) -> _Opened:
        o = self._opened
        if o is None or o.pid != os.getpid():
            with _OPEN_LOCK:  # the cell stream may read several units at once (fetch_units)
                o = self._opened
                if o is None or o.pid != os.getpid():
                    o = self._opened = _Opened(
                        self.path, self.meta, self.cache_bytes, self.direct, self.verify
                    )
        return o

    def _per_cell(self, o: _Opened, name: str, start: int, stop: int) -> np.ndarray:
        if o.cached:
            return o.cache[name][start:stop].copy()
        return o.readers[name].read(start, stop)

    def read_unit(self, unit: int) -> CellBlock:
        """Cell chunk ``unit``: rows [unit*chunk_cells, min(... + chunk_cells, n_cells))."""
        if not 0 <= unit < len(self.meta.unit_sizes):
            raise IndexError(f"unit {unit} outside [0, {len(self.meta.unit_sizes)})")
        start = unit * self.chunk_cells
        return self.read_rows(start, start + int(self.meta.unit_sizes[unit]))

    def read_rows(self, start: int, stop: int) -> CellBlock:
        """Rows [start, stop) as one block (reads only the chunks that hold them)."""
        check_row_range(start, stop, self.meta.n_cells)
        return self.read_ranges([(start, stop)])

    def read_units(self, units) -> CellBlock:
        """Whole units, concatenated in the order given (the cell stream's pools)."""
        n = len(self.meta.unit_sizes)
        if any(not 0 <= int(u) < n for u in units):
            raise IndexError(f"units {list(units)} outside [0, {n})")
        c = self.chunk_cells
        return self.read_ranges(
            [(int(u) * c, int(u) * c + int(self.meta.unit_sizes[int(u)])) for u in units]
        )

    def read_ranges(self, ranges: list[tuple[int, int]]) -> CellBlock:
        """Row ranges concatenated into one block, each decoded straight into its place.

        Why not ``CellBlock.concat`` of ``read_rows``: that copies every value a second time;
        building a pool of 8 units this way spends about 15% less CPU (`benchmark loader`).
        """
        o = self._o()
        indptrs = [self._per_cell(o, "X/indptr", a, b + 1) for a, b in ranges]
        nnz = [int(p[-1] - p[0]) for p in indptrs]
        at = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
        data = np.empty(int(at[-1]), dtype=np.float32)
        indices = np.empty(int(at[-1]), dtype=np.int32)
        for p, lo, hi in zip(indptrs, at[:-1], at[1:], strict=True):
            a, b = int(p[0]), int(p[-1])
            o.readers["X/data"].read(a, b, out=data[lo:hi])
            o.readers["X/indices"].read(a, b, out=indices[lo:hi])
        index_dtype = np.int32 if at[-1] < 2**31 else np.int64
        indptr = np.concatenate(
            [[0]] + [p[1:] - p[0] + lo for p, lo in zip(indptrs, at[:-1], strict=True)]
        ).astype(index_dtype)
        n_rows = int(sum(b - a for a, b in ranges))
        X = sp.csr_matrix((n_rows, self.meta.n_genes), dtype=np.float32)
        X.data, X.indices, X.indptr = data, indices, indptr  # no constructor scan or copy

        def per_cell(name: str) -> np.ndarray:
            parts = [self._per_cell(o, name, a, b) for a, b in ranges]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        names = None
        if self.names:  # never cached: read only when asked for
            reader = o.readers[f"obs/{NAMES_COLUMN}"]
            names = np.concatenate([np.asarray(reader.read(a, b), dtype=str) for a, b in ranges])
        return CellBlock(
            X=X,
            rows=np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]),
            library_size=per_cell("library_size"),
            codes={c: per_cell(f"obs/{c}/codes") for c in self.meta.categories},
            numeric={c: per_cell(f"obs/{c}") for c in self.meta.numeric_columns},
            names=names,
        )

    def group_index(self) -> pd.DataFrame:
        if self._groups is None:
            group = self._o().group
            groups = pd.DataFrame(
                {
                    col: _ZarrRange(group[f"groups/{col}"], join(self.path, "groups", col)).read(
                        0, None
                    )
                    for col in (*ROLES, "start", "stop")
                }
            )
            self._groups = check_group_index(groups, self.meta, join(self.path, "groups"))
        return self._groups.copy()


def _open_group(root: Path | str, remote: RemoteRoot | None) -> zarr.Group:
    """The store's root group, from the directory or, for a URL, through fsspec (``remote``);
    a failed request is one line naming the URL."""
    if remote is None:
        return zarr.open_group(root, mode="r", zarr_format=3)
    try:
        return zarr.open_group(store=remote.zarr_store(), mode="r", zarr_format=3)
    except (DataValidationError, KeyError, FileNotFoundError, ValueError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - network or credentials
        raise remote_error(remote.url, err) from err


def _check_arrays(root: Path | str, meta) -> None:
    """The arrays' shapes and chunking agree with the manifest (zarr.json of each array), and
    X/indptr starts at 0 and ends at nnz: a count edited in one place is caught at open."""
    mpath = join(root, MANIFEST_NAME)
    manifest = meta.manifest
    remote = RemoteRoot(root) if is_url(root) else None
    try:
        group = _open_group(root, remote)
        per_cell = ["library_size", f"obs/{NAMES_COLUMN}"]
        per_cell += [f"obs/{c}/codes" for c in meta.categories]
        per_cell += [f"obs/{c}" for c in meta.numeric_columns]
        nnz = int(manifest["nnz"])
        n_ranges = manifest.get("n_group_ranges")
        expected = {name: (meta.n_cells, meta.manifest["chunk_cells"]) for name in per_cell}
        expected["X/indptr"] = (meta.n_cells + 1, meta.manifest["chunk_cells"])
        expected.update({"X/data": (nnz, None), "X/indices": (nnz, None)})
        expected.update({f"var/{k}": (meta.n_genes, None) for k in meta.manifest["var"]})
        if n_ranges is not None:
            expected.update({f"groups/{c}": (n_ranges, None) for c in (*ROLES, "start", "stop")})
        for name, (length, chunk) in expected.items():
            array = group[name]
            if array.shape != (length,) or (chunk is not None and array.chunks != (chunk,)):
                raise corrupt(
                    mpath, name, f"the manifest implies {length} values in chunks of {chunk}, "
                    f"the array has shape {array.shape} in chunks of {array.chunks}",
                )  # fmt: skip
        indptr = chunk_reader(group["X/indptr"], root, remote=remote) or _ZarrRange(
            group["X/indptr"], root
        )
        ends = (int(indptr.read(0, 1)[0]), int(indptr.read(meta.n_cells, meta.n_cells + 1)[0]))
    except (KeyError, FileNotFoundError, ValueError, TypeError) as err:
        if isinstance(err, DataValidationError):
            raise
        raise corrupt(root, "arrays", f"cannot open the store's arrays ({err})") from err
    if ends != (0, nnz):
        raise corrupt(
            join(root, "X", "indptr"), "X/indptr", f"runs {ends[0]}..{ends[1]}, not 0..{nnz}"
        )
