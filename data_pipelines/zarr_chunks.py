"""Read a range of a 1-D Zarr v3 array straight from its chunk files (the store's hot path).

Why not ``zarr.Array.__getitem__``: in zarr-python 3 every synchronous read is a round trip
through its asyncio event-loop thread, about 0.7 ms even for a few bytes on a local disk
(measured, zarr 3.1.6). A cell-chunk read needs two such reads (``X/data``, ``X/indices``),
which is most of the 3.3 ms that 1000 cells may take at the 300k cells/s target. Reading the
chunk files ourselves and decoding them with numcodecs (the same library zarr calls) costs the
file read plus the decompression and nothing else: 757k against 256k cells/s on the same
blosc-lz4 store (`latentcell benchmark codecs`).

The format is still zarr's: arrays are created, written and described by zarr, and this class
only reads what the Zarr v3 spec fixes (chunk key encoding from the metadata, the codec chain,
the fill value for missing chunks, full-size edge chunks). Codec chains it does not know
(sharding, filters other than the bytes/vlen-utf8 serialiser plus one compressor and an
optional trailing ``crc32c``) return ``None`` from :func:`chunk_reader`, and callers fall
back to zarr.

Integrity (``integrity``): when the chain ends with ``crc32c`` (every array of a version-2
store), each chunk's checksum is verified before decoding, and compared with the store's
table of checksums by position (so a chunk moved or copied from elsewhere is caught too);
a missing chunk file is an error rather than fill values, because such stores write every
chunk. A chunk that fails
its checksum, cannot be decoded or decodes to the wrong size raises ``CorruptDataError``
naming the chunk file.

Remote stores (``remote``): given a ``RemoteRoot``, chunk files are fetched through fsspec
instead of ``open``, all chunks of one read in one concurrent request batch (a request costs
10-100 ms, a local read microseconds); the checks and the decoding are the same code.
"""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, VLenUTF8Codec, ZstdCodec

from .errors import CorruptDataError
from .integrity import corrupt, crc32c

_VLEN = numcodecs.VLenUTF8()


def _compressor(codec) -> numcodecs.abc.Codec | None:
    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc()  # a blosc frame describes itself; decode needs no settings
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd()
    if isinstance(codec, GzipCodec):
        return numcodecs.GZip()
    config = getattr(codec, "codec_config", None)  # zarr's wrappers of numcodecs codecs
    if isinstance(config, dict) and "id" in config:
        try:
            return numcodecs.get_codec(dict(config))
        except (ValueError, KeyError):
            return None
    return None


class ChunkReader:
    """Decodes element ranges of one 1-D Zarr v3 array from its chunk files.

    checksum: the chain ends with ``crc32c``; chunks are then verified and must all exist.
    """

    def __init__(
        self,
        array,
        directory: Path | str,
        serializer,
        compressor,
        checksum,
        verify=True,
        table=None,
        remote=None,
    ):
        md = array.metadata
        self._remote, self._name = remote, array.path  # remote: a RemoteRoot, or None
        self.n = int(md.shape[0])
        self.chunk = int(md.chunk_grid.chunk_shape[0])
        self._dir = str(directory)
        self._key = md.encode_chunk_key
        self._vlen = isinstance(serializer, VLenUTF8Codec)
        if self._vlen:
            self.dtype = np.dtype(object)
            self.fill = ""
        else:
            native = md.data_type.to_native_dtype()
            endian = getattr(serializer.endian, "value", serializer.endian)
            order = {"little": "<", "big": ">"}.get(endian, "=")
            self.dtype = native.newbyteorder(order) if native.itemsize > 1 else native
            self.fill = md.fill_value
        self._compressor = compressor
        self._checksum, self._verify, self._table = checksum, verify, table
        if table is not None and len(table) != -(-self.n // self.chunk):
            raise corrupt(directory, "crc32c", f"the chunk checksum table has {len(table)} "
                          f"entries for {-(-self.n // self.chunk)} chunks")  # fmt: skip
        # Whole chunks can be decoded in place when no byte swap or object decoding is needed.
        self._direct = not self._vlen and self.dtype.isnative

    def _path(self, i: int) -> str:
        return f"{self._dir}/{self._key((i,))}"

    def _fetch(self, first: int, last: int) -> dict[int, bytes | None] | None:
        """Remote stores: chunks [first, last] fetched at once (None: local, read lazily)."""
        if self._remote is None:
            return None
        names = [f"{self._name}/{self._key((i,))}" for i in range(first, last + 1)]
        return dict(zip(range(first, last + 1), self._remote.read_many(names), strict=True))

    def _payload(self, i: int, fetched: dict | None = None) -> np.ndarray | None:
        """Chunk ``i``'s stored bytes, checksum verified and stripped; None when the chunk
        file does not exist and the array may omit chunks (then it reads as fill values).
        ``fetched``: the bytes of a remote store's chunks (``_fetch``)."""
        path = self._path(i)
        if fetched is not None:
            data = fetched[i]
            raw = None if data is None else np.frombuffer(data, dtype=np.uint8)
        else:
            try:
                with open(path, "rb", buffering=0) as f:
                    raw = np.frombuffer(f.read(), dtype=np.uint8)
            except FileNotFoundError:
                raw = None
        if raw is None:
            if self._checksum:
                raise corrupt(path, "chunk", "the chunk file is missing")
            return None
        if not self._checksum:
            return raw
        if len(raw) < 4:
            raise corrupt(path, "crc32c", "the chunk file is too short to hold its checksum")
        if self._verify:
            stored = int(raw[-4:].view("<u4")[0])
            if crc32c(raw[:-4]) != stored:
                raise corrupt(path, "crc32c", "the chunk does not match its checksum")
            if self._table is not None and stored != int(self._table[i]):
                raise corrupt(path, "crc32c", "the chunk is intact but not the one written at "
                              "this position (moved or copied from elsewhere)")  # fmt: skip
        return raw[:-4]

    def _decoded(self, i: int, raw: np.ndarray, out: np.ndarray | None = None):
        """``raw`` decompressed (into ``out`` when given); decoding failures name the file."""
        try:
            if self._compressor is None:
                if out is None:
                    return raw
                if raw.nbytes != out.nbytes:
                    raise ValueError(f"{raw.nbytes} bytes, expected {out.nbytes}")
                out.view(np.uint8)[:] = raw
                return out
            return self._compressor.decode(raw, out=out)
        except CorruptDataError:
            raise
        except Exception as err:  # noqa: BLE001 - any codec failure is a damaged chunk
            raise corrupt(
                self._path(i), "chunk", f"cannot decode ({type(err).__name__}: {err})"
            ) from err

    def _chunk(self, i: int, fetched: dict | None = None) -> np.ndarray:
        raw = self._payload(i, fetched)
        if raw is None:
            return np.full(self.chunk, self.fill, dtype=self.dtype)
        decoded = self._decoded(i, raw)
        if self._vlen:
            try:
                values = _VLEN.decode(decoded)
            except Exception as err:  # noqa: BLE001
                raise corrupt(self._path(i), "chunk", f"cannot decode strings ({err})") from err
        else:
            values = np.frombuffer(decoded, dtype=self.dtype)
        if len(values) != self.chunk:
            raise corrupt(
                self._path(i), "chunk", f"holds {len(values)} values, expected {self.chunk}"
            )
        return values

    def _chunk_into(self, i: int, out: np.ndarray, fetched: dict | None = None) -> None:
        """Decode whole chunk ``i`` straight into ``out`` (saves a copy of every chunk)."""
        if not self._direct or out.dtype != self.dtype:
            out[:] = self._chunk(i, fetched)
            return
        raw = self._payload(i, fetched)
        if raw is None:
            out[:] = self.fill
            return
        self._decoded(i, raw, out=out)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, stop) as a new native-endian array (object dtype for strings), or
        written into ``out`` (``stop - start`` values, cast to its dtype) and returned: a
        reader filling one buffer from several ranges saves a copy of each."""
        if not (0 <= start <= stop <= self.n):
            raise IndexError(f"[{start}, {stop}) outside [0, {self.n})")
        if out is not None and len(out) != stop - start:
            raise ValueError(f"out holds {len(out)} values, the range {stop - start}")
        if stop <= start:
            return np.empty(0, dtype=self.dtype.newbyteorder("=")) if out is None else out
        c = self.chunk
        first, last = start // c, (stop - 1) // c
        fetched = self._fetch(first, last)
        if first == last and (start > first * c or stop < (first + 1) * c):
            part = self._chunk(first, fetched)[start - first * c : stop - first * c]
            if out is not None:
                out[:] = part
                return out
            return part.astype(self.dtype.newbyteorder("="), copy=True)
        if out is None:
            out = np.empty(stop - start, dtype=self.dtype.newbyteorder("="))
        for i in range(first, last + 1):
            lo, hi = max(start, i * c), min(stop, (i + 1) * c)
            if hi - lo == c:
                self._chunk_into(i, out[lo - start : hi - start], fetched)
            else:
                out[lo - start : hi - start] = self._chunk(i, fetched)[lo - i * c : hi - i * c]
        return out


def chunk_reader(
    array: zarr.Array,
    store_root: Path | str,
    verify: bool = True,
    crc_table: np.ndarray | None = None,
    remote=None,
) -> ChunkReader | None:
    """A :class:`ChunkReader` for ``array`` in the local directory store at ``store_root``
    (or, with ``remote``, a ``RemoteRoot``: the store at that URL), or ``None`` when the
    array's layout is one this module does not decode. ``verify=False`` strips checksums
    without checking them (only to measure what checking costs).
    ``crc_table``: the checksum each chunk must carry, by position."""
    md = array.metadata
    if getattr(md, "zarr_format", None) != 3 or len(md.shape) != 1:
        return None
    if type(md.chunk_grid).__name__ != "RegularChunkGrid":
        return None
    codecs = list(md.codecs)
    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if checksum:
        codecs = codecs[:-1]
    if not codecs or not isinstance(codecs[0], (BytesCodec, VLenUTF8Codec)) or len(codecs) > 2:
        return None
    compressor = None
    if len(codecs) == 2:
        compressor = _compressor(codecs[1])
        if compressor is None:
            return None
    directory = remote.url_of(array.path) if remote is not None else store_root / array.path
    return ChunkReader(array, directory, codecs[0], compressor, checksum, verify, crc_table, remote)
