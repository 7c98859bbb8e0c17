"""``latentcell data verify`` for a store behind a URL: every sha256 of the manifest, remotely.

Why a separate path: locally a Zarr array's checksum (``atomic.sha256_tree``) hashes the files
found by walking its directory, but most object stores cannot be listed over HTTP(S). The
files of an array are fixed by its own metadata instead (``zarr.json`` plus one file per
chunk: latentcell stores write every chunk), so the same digest is computed from that list.
A file added to an array directory or an unlisted extra shard goes unnoticed remotely (no
listing); everything the readers use is checked. Files are fetched a few at a time, so a
large store is hashed without holding it in memory.
"""

from __future__ import annotations

import hashlib
import json

from .errors import DataValidationError
from .remote import RemoteRoot
from .safe_paths import check_relative_name
from .store_common import read_manifest
from .store_layout import MANIFEST_NAME

_BATCH = 32  # files fetched concurrently


def verify_remote_store(url: str) -> list[str]:
    """The problems of the store at ``url`` (empty: intact), as ``stores.verify_store``."""
    from .stores import open_store

    try:
        manifest = read_manifest(url)
        reader = open_store(url)
        if manifest["format"] != "latent":
            reader.group_index()
    except DataValidationError as err:
        return [str(err)]
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        return [f"{url}: manifest has no checksums"]
    root = RemoteRoot(url)
    problems = []
    for name, expected in sorted(checksums.items()):
        try:
            check_relative_name(name, root.url_of(MANIFEST_NAME), "checksums")
            if manifest["format"] == "zarr":
                actual = _array_digest(root, name)
            else:
                actual = _file_digest(root, name)
        except DataValidationError as err:
            problems.append(str(err))
            continue
        if actual is None:
            problems.append(f"{name}: missing")
        elif actual != expected:
            problems.append(f"{name}: checksum mismatch (expected {expected}, got {actual})")
    return problems


def _file_digest(root: RemoteRoot, name: str) -> str | None:
    (data,) = root.read_many([name])
    return None if data is None else hashlib.sha256(data).hexdigest()


def _array_digest(root: RemoteRoot, name: str) -> str | None:
    """``atomic.sha256_tree`` of the array directory ``name``, its files listed from its
    metadata: relative path, NUL, size, NUL, bytes, in sorted path order."""
    (meta,) = root.read_many([f"{name}/zarr.json"])
    if meta is None:
        return None
    try:
        files = sorted(["zarr.json", *_chunk_keys(json.loads(meta))])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise DataValidationError(
            root.url_of(f"{name}/zarr.json"), "metadata", f"unreadable ({err})",
            "upload the store again",
        ) from err  # fmt: skip
    h = hashlib.sha256()
    for i in range(0, len(files), _BATCH):
        part = files[i : i + _BATCH]
        blobs = root.read_many([f"{name}/{rel}" for rel in part])
        for rel, data in zip(part, blobs, strict=True):
            if data is None:
                return None
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
            h.update(data)
    return h.hexdigest()


def _chunk_keys(meta: dict) -> list[str]:
    """The chunk file names of a 1-D Zarr v3 array (default or v2 key encoding)."""
    (length,) = meta["shape"]
    (chunk,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    sep = encoding.get("configuration", {}).get(
        "separator", "/" if encoding["name"] == "default" else "."
    )
    prefix = f"c{sep}" if encoding["name"] == "default" else ""
    return [f"{prefix}{i}" for i in range(-(-int(length) // int(chunk)))]
