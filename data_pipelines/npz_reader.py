"""Parse an ``np.savez`` archive held in memory into array views (the WebDataset sample).

Why hand-written rather than ``np.load``: ``np.load`` of a ``.npz`` goes through ``zipfile``
(a file object, a CRC pass and an ``ast.literal_eval`` of the header, per array) and costs
about 1.6 ms per 8-array sample against about 0.1 ms here (measured); with 256-cell samples
a shard read runs at ~265k cells/s with ``np.load`` and ~780k with this (`latentcell benchmark codecs`).
The parser accepts exactly what ``np.savez`` writes (stored zip members, zip64 sizes, simple
dtypes, C order) and returns ``None`` for anything else, so the caller falls back to
``np.load``. CRCs are not checked here: ``verify_store`` hashes whole shards.
"""

from __future__ import annotations

import functools
import math
import re
import struct

import numpy as np

_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][A-Za-z][0-9]*)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}"
)


def read_npz(raw: bytes | bytearray | memoryview) -> dict[str, np.ndarray] | None:
    """The arrays of an ``np.savez`` archive as views into ``raw`` (writable when ``raw`` is),
    or ``None`` when the archive uses anything ``np.savez`` does not write."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    view = memoryview(raw)
    while bytes(view[pos : pos + 4]) == b"PK\x03\x04":
        flags, method = struct.unpack_from("<HH", view, pos + 6)
        csize, usize, nlen, xlen = struct.unpack_from("<IIHH", view, pos + 18)
        if method != 0 or flags & 0x08:  # compressed, or sizes in a trailing descriptor
            return None
        name = bytes(view[pos + 30 : pos + 30 + nlen]).decode()
        if csize == 0xFFFFFFFF:
            csize = _zip64_compressed_size(view, pos + 30 + nlen, xlen, usize == 0xFFFFFFFF)
            if csize is None:
                return None
        start = pos + 30 + nlen + xlen
        array = _read_npy(view, start, csize)
        if array is None or not name.endswith(".npy"):
            return None
        out[name[:-4]] = array
        pos = start + csize
    if not out or bytes(view[pos : pos + 4]) != b"PK\x01\x02":  # central directory next
        return None
    return out


def _zip64_compressed_size(view, pos: int, xlen: int, has_usize: bool) -> int | None:
    end = pos + xlen
    while pos + 4 <= end:
        header_id, size = struct.unpack_from("<HH", view, pos)
        if header_id == 0x0001:
            values = struct.unpack_from(f"<{size // 8}Q", view, pos + 4)
            i = 1 if has_usize else 0
            return values[i] if len(values) > i else None
        pos += 4 + size
    return None


@functools.lru_cache(maxsize=4096)
def _header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, count) of an npy header; cached because the samples of a store repeat
    most headers (every per-cell array of a full sample), and parsing was half a sample's
    cost."""
    match = _NPY_HEADER.match(header)
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode())
    if dtype.hasobject:
        return None
    shape = tuple(int(s) for s in match.group(2).split(b",") if s.strip())
    return dtype, shape, math.prod(shape)


def _read_npy(view, start: int, size: int) -> np.ndarray | None:
    if bytes(view[start : start + 6]) != b"\x93NUMPY":
        return None
    major = view[start + 6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", view, start + 8)
        header_start = start + 10
    else:
        (hlen,) = struct.unpack_from("<I", view, start + 8)
        header_start = start + 12
    parsed = _header(bytes(view[header_start : header_start + hlen]))
    if parsed is None:
        return None
    dtype, shape, count = parsed
    offset = header_start + hlen
    if offset + count * dtype.itemsize > start + size:
        return None
    return np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
