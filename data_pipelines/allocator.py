"""Keep freed pool memory in the process instead of handing it back to the kernel each time.

Why: the cell stream allocates and frees a pool's arrays (several MB each) every few
milliseconds. glibc serves blocks that large with ``mmap`` and returns them on ``free``, or
trims them off the heap top, so every pool faults its pages in afresh: on this project's
2-core machine a third of the stream's CPU time was in the kernel (0.13 of 0.43 s per
200k-cell epoch), and raising glibc's two thresholds halved it and sped the stream up by
about 10% (`latentcell benchmark loader`, alternated). The thresholds are process-wide, so
they are raised once, only on glibc, only to bounds that keep a training process's memory
in check (blocks above ``MMAP_THRESHOLD`` still go back at once; at most ``TRIM_THRESHOLD``
of free heap is kept). ``LATENTCELL_KEEP_FREED_MEMORY=0`` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "LATENTCELL_KEEP_FREED_MEMORY"
MMAP_THRESHOLD = 64 << 20  # blocks up to this come from the heap (pool arrays do)
TRIM_THRESHOLD = 512 << 20  # free heap kept before trimming
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are raised."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
