"""Read a range of a 1-D Zarr v3 array straight from its chunk files (the store's hot path).

Why not ``zarr.Array.__getitem__``: in zarr-python 3 every synchronous read is a round trip
through its asyncio event-loop thread, about 0.7 ms even for a few bytes on a local disk
(measured, zarr 3.1.6). A cell-chunk read needs two such reads (``X/data``, ``X/indices``),
which is most of the 3.3 ms that 1000 cells may take at the 300k cells/s target. Reading the
chunk files ourselves and decoding them with numcodecs (the same library zarr calls) costs the
file read plus the decompression and nothing else: 757k against 256k cells/s on the same
blosc-lz4 store (codec_benchmark).

The format is still zarr's: arrays are created, written and described by zarr, and this class
only reads what the Zarr v3 spec fixes (chunk key encoding from the metadata, the codec chain,
the fill value for missing chunks, full-size edge chunks). Codec chains it does not know
(sharding, filters other than the bytes/vlen-utf8 serialiser plus one compressor) return
``None`` from :func:`chunk_reader`, and callers fall back to zarr.
"""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, VLenUTF8Codec, ZstdCodec

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
    """Decodes element ranges of one 1-D Zarr v3 array from its chunk files."""

    def __init__(self, array: zarr.Array, directory: Path, serializer, compressor):
        md = array.metadata
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
        # Whole chunks can be decoded in place when no byte swap or object decoding is needed.
        self._direct = not self._vlen and self.dtype.isnative

    def _path(self, i: int) -> str:
        return f"{self._dir}/{self._key((i,))}"

    def _chunk(self, i: int) -> np.ndarray:
        try:
            with open(self._path(i), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return np.full(self.chunk, self.fill, dtype=self.dtype)
        if self._compressor is not None:
            raw = self._compressor.decode(raw)
        if self._vlen:
            return _VLEN.decode(raw)
        return np.frombuffer(raw, dtype=self.dtype)

    def _chunk_into(self, i: int, out: np.ndarray) -> None:
        """Decode whole chunk ``i`` straight into ``out`` (saves a copy of every chunk)."""
        if not self._direct:
            out[:] = self._chunk(i)
            return
        try:
            with open(self._path(i), "rb", buffering=0) as f:
                if self._compressor is None:
                    if f.readinto(out) != out.nbytes:
                        raise OSError(f"{self._path(i)}: short chunk file")
                    return
                raw = f.read()
        except FileNotFoundError:
            out[:] = self.fill
            return
        self._compressor.decode(raw, out=out)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) as a new native-endian array (object dtype for strings)."""
        if not (0 <= start <= stop <= self.n):
            raise IndexError(f"[{start}, {stop}) outside [0, {self.n})")
        if stop <= start:
            return np.empty(0, dtype=self.dtype.newbyteorder("="))
        c = self.chunk
        first, last = start // c, (stop - 1) // c
        if first == last and (start > first * c or stop < (first + 1) * c):
            part = self._chunk(first)[start - first * c : stop - first * c]
            return part.astype(self.dtype.newbyteorder("="), copy=True)
        out = np.empty(stop - start, dtype=self.dtype.newbyteorder("="))
        for i in range(first, last + 1):
            lo, hi = max(start, i * c), min(stop, (i + 1) * c)
            if hi - lo == c:
                self._chunk_into(i, out[lo - start : hi - start])
            else:
                out[lo - start : hi - start] = self._chunk(i)[lo - i * c : hi - i * c]
        return out


def chunk_reader(array: zarr.Array, store_root: Path) -> ChunkReader | None:
    """A :class:`ChunkReader` for ``array`` in the local directory store at ``store_root``,
    or ``None`` when the array's layout is one this module does not decode."""
    md = array.metadata
    if getattr(md, "zarr_format", None) != 3 or len(md.shape) != 1:
        return None
    if type(md.chunk_grid).__name__ != "RegularChunkGrid":
        return None
    codecs = list(md.codecs)
    if not codecs or not isinstance(codecs[0], (BytesCodec, VLenUTF8Codec)) or len(codecs) > 2:
        return None
    compressor = None
    if len(codecs) == 2:
        compressor = _compressor(codecs[1])
        if compressor is None:
            return None
    return ChunkReader(array, store_root / array.path, codecs[0], compressor)
