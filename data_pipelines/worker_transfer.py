"""A batch crosses from a DataLoader worker to the main process as one shared-memory block.

Why: torch moves each tensor of a worker's item through its own shared-memory segment
(create, pass a file descriptor, map), about 0.3 ms apiece; a cell batch holds a dozen
tensors (the three arrays of sparse CSR ``X``, every obs column, rows, padding), so a
worker delivered 51k cells/s against 600k in-process (`latentcell benchmark loader`). Here a
worker copies every array of the item into one uint8 block (about 50 us for a CSR batch),
sent as bytes when small and as one shared-memory tensor when large, and the main process
rebuilds the same nested dict of tensors as views into it.

Only loaders that unpack use this (``StreamLoader`` sets ``pack_in_workers`` on its
dataset); a plain ``DataLoader`` over a stream gets ordinary tensors.
"""

from __future__ import annotations

import numpy as np
import torch

PACKED_KEY = "_packed_item"
_ALIGN = 64  # every array starts on a cache line, so each view is aligned for its dtype
# Below this a block goes through the worker's pipe as bytes (a sparse batch of 256 cells,
# ~0.5 MB: 190k cells/s against 140k through shared memory); above, as one shared-memory
# tensor (a dense batch, 2 MB: 96k against 62k through the pipe).
SHARED_FROM_BYTES = 1 << 20


def pack(item: dict) -> dict:
    """``item`` (nested dicts/lists of tensors, sparse CSR included, and plain values) as
    ``{PACKED_KEY: (buffer, layout)}``; ``unpack`` inverts it."""
    arrays: list[np.ndarray] = []
    layout = _describe(item, arrays)
    sizes = [-(-a.nbytes // _ALIGN) * _ALIGN for a in arrays]
    total = int(sum(sizes))
    if total >= SHARED_FROM_BYTES:
        buffer = torch.empty(total, dtype=torch.uint8)
        raw = buffer.numpy()
    else:
        buffer = raw = np.empty(total, dtype=np.uint8)
    at = 0
    for a, size in zip(arrays, sizes, strict=True):
        raw[at : at + a.nbytes] = a.reshape(-1).view(np.uint8)
        at += size
    return {PACKED_KEY: (buffer, layout)}


def unpack(item: dict) -> dict:
    """The item ``pack`` was given, its tensors now views into the one received buffer."""
    if PACKED_KEY not in item:
        return item
    buffer, layout = item[PACKED_KEY]
    raw = buffer.numpy() if isinstance(buffer, torch.Tensor) else buffer
    return _rebuild(layout, raw)


def _describe(value, arrays: list):
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_csr:
            parts = (value.crow_indices(), value.col_indices(), value.values())
            return ("csr", tuple(_describe(p, arrays) for p in parts), tuple(value.shape))
        if value.layout != torch.strided:
            return ("obj", value)  # other layouts go the ordinary way
        array = value.detach().contiguous().numpy()
        arrays.append(array)
        return ("dense", array.dtype.str, array.shape)
    if isinstance(value, dict):
        return ("dict", {k: _describe(v, arrays) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_describe(v, arrays) for v in value])
    return ("obj", value)


def _rebuild(layout, raw: np.ndarray, cursor: list | None = None):
    cursor = [0] if cursor is None else cursor
    kind = layout[0]
    if kind == "dense":
        dtype, shape = np.dtype(layout[1]), layout[2]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        at = cursor[0]
        cursor[0] += -(-nbytes // _ALIGN) * _ALIGN
        array = raw[at : at + nbytes].view(dtype).reshape(shape)
        return torch.from_numpy(array)
    if kind == "csr":
        crow, col, values = (_rebuild(p, raw, cursor) for p in layout[1])
        return torch.sparse_csr_tensor(crow, col, values, size=layout[2], check_invariants=False)
    if kind == "dict":
        return {k: _rebuild(v, raw, cursor) for k, v in layout[1].items()}
    if kind in ("list", "tuple"):
        values = [_rebuild(v, raw, cursor) for v in layout[1]]
        return values if kind == "list" else tuple(values)
    return layout[1]
