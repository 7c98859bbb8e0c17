"""The integrity layer under both store formats: checksums checked on every read, a sealed manifest.

What a reader trusts, and how each is checked (store format version 2 and later):

- **Units on every read.** A Zarr chunk file ends with the CRC32C of its bytes: the Zarr v3
  ``crc32c`` codec, last in every array's codec chain, so zarr-python verifies it too. Every
  chunk is written (``write_empty_chunks``), so a missing chunk file is damage, not zeros.
  A WebDataset shard's CRC32C and size are in the manifest and checked when the shard is read
  whole; its members must be regular files with plain ``<key>.cells.npz`` names, each key
  once. CRC32C (hardware, about 6 GB/s here) rather than sha256 (0.8 GB/s): reads are
  checked all the time, so the check must cost next to nothing; ``data verify`` still
  recomputes the sha256 of every file.
- **The manifest.** It carries ``manifest_sha256``, the sha256 of its own canonical JSON
  (without that key), so an edited count or shard entry is caught when the store is opened;
  the readers then compare its counts with the arrays and shards themselves.
- Version-1 stores (built before this layer) are read as before, with neither check.

Damage raises ``CorruptDataError`` naming the file; the loaders turn it into a skipped unit
only when the user asked for ``data.on_corrupt = "skip"``.
"""

from __future__ import annotations

import hashlib
import json
import os

import google_crc32c  # zarr's own dependency (its crc32c codec)
import numpy as np

from .errors import CorruptDataError

__all__ = [
    "CHECKSUM",
    "ON_CORRUPT",
    "corrupt",
    "crc32c",
    "manifest_digest",
    "seal_manifest",
    "check_manifest_seal",
]

CHECKSUM = "crc32c"
SEAL_KEY = "manifest_sha256"
ON_CORRUPT = ("error", "skip")
CORRUPT_FIX = (
    "restore the file or rebuild the store (`latentcell data verify STORE` lists every damaged "
    'file); to train on the rest, set data.on_corrupt = "skip"'
)


def corrupt(path: str | os.PathLike, field: str, problem: str) -> CorruptDataError:
    """The error for a damaged unit (``path``: the damaged file, ``field``: where in it)."""
    return CorruptDataError(str(path), field, problem, CORRUPT_FIX)


def crc32c(buffer) -> int:
    """CRC32C of a bytes-like object (a numpy array or bytes; memoryviews are copied)."""
    if isinstance(buffer, memoryview):
        buffer = np.frombuffer(buffer, dtype=np.uint8)
    return int(google_crc32c.value(buffer))


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own seal left out."""
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its seal (call last, when nothing else will change)."""
    body = json.loads(json.dumps(manifest, default=_plain))  # the JSON the file will hold
    return {**body, SEAL_KEY: manifest_digest(body)}


def check_manifest_seal(manifest: dict, path: str | os.PathLike, sealed: bool) -> None:
    """Raise when a manifest that must be ``sealed`` (format version 2 on) has no seal or was
    changed after the build."""
    seal = manifest.get(SEAL_KEY)
    if seal is None and not sealed:
        return
    if seal is None:
        raise corrupt(path, SEAL_KEY, "missing: the manifest was rewritten after the build")
    if seal != manifest_digest(manifest):
        raise corrupt(
            path,
            SEAL_KEY,
            "the manifest was changed after the build (its own sha256 does not match)",
        )


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
