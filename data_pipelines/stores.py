"""Choose a store format by name, open a store by its manifest, verify its checksums.

The rest of the project (build, loaders, inspect) goes through these three functions and
never imports a format module directly. Stores are read from a local directory or from any
fsspec URL (``remote``: ``s3://``, ``gs://``, ``https://``, chained caches); they are
written locally only.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import sha256_file, sha256_tree
from .blocks import StoreReader, StoreSpec, StoreWriter
from .errors import DataValidationError
from .remote import is_url
from .safe_paths import resolve_inside
from .store_common import read_manifest
from .store_layout import MANIFEST_NAME
from .webdataset_store import WebDatasetStoreReader, WebDatasetStoreWriter
from .zarr_store import ZarrStoreReader, ZarrStoreWriter

FORMATS = ("zarr", "webdataset")


def make_writer(format: str, out: str | os.PathLike, spec: StoreSpec, **opts) -> StoreWriter:
    """A writer for ``format``. opts: overwrite, and for zarr chunk_cells, codec, nnz_chunk,
    index_dtype; for webdataset block_cells, cells_per_shard (see each writer)."""
    if format == "zarr":
        return ZarrStoreWriter(out, spec, **opts)
    if format == "webdataset":
        return WebDatasetStoreWriter(out, spec, **opts)
    raise DataValidationError(
        out, "--format", f"unknown store format {format!r}", f"use one of {', '.join(FORMATS)}"
    )


def open_store(path: str | os.PathLike, **opts) -> StoreReader:
    """The reader for the store at ``path``, a directory or a URL (format from its
    manifest). opts: ``names`` (bool), and for zarr ``cache_bytes``. Raises
    DataValidationError when ``path`` is missing or unreachable, is not a store, or has no
    manifest (an interrupted build never writes one)."""
    manifest = read_manifest(path)
    if manifest["format"] == "zarr":
        return ZarrStoreReader(path, **opts)
    if manifest["format"] == "latent":
        if is_url(path):
            raise DataValidationError(
                path, "format", "latent stores are read from local directories only",
                "copy the latent store to local disk and pass its path",
            )  # fmt: skip
        from .latent_store import LatentStoreReader

        return LatentStoreReader(path, **opts)
    return WebDatasetStoreReader(path, **opts)


def verify_store(path: str | os.PathLike) -> list[str]:
    """Check the manifest (its seal and counts, as opening does) and recompute every sha256
    it lists; returns the problems (empty: intact). Names in the manifest are followed only
    inside the store (``safe_paths``). A URL is verified by ``verify_remote_store``."""
    if is_url(path):
        from .remote_verify import verify_remote_store

        return verify_remote_store(str(path))
    root = Path(path)
    try:
        manifest = read_manifest(root)
        reader = open_store(root)  # the manifest's structure and counts against the files
        if manifest["format"] != "latent":  # latent stores have no group index
            reader.group_index()
    except DataValidationError as err:
        return [str(err)]
    if not isinstance(manifest.get("checksums"), dict):
        return [f"{root}: manifest has no checksums"]
    checksums = manifest["checksums"]
    problems = []
    for name, expected in sorted(checksums.items()):
        try:
            target = resolve_inside(root, name, root / MANIFEST_NAME, "checksums")
        except DataValidationError as err:
            problems.append(str(err))
            continue
        if not target.exists():
            problems.append(f"{name}: missing")
            continue
        actual = sha256_tree(target) if target.is_dir() else sha256_file(target)
        if actual != expected:
            problems.append(f"{name}: checksum mismatch (expected {expected}, got {actual})")
    if manifest["format"] == "webdataset":
        listed = {s["name"] for s in manifest.get("shards", [])}
        extra = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
        problems += [f"{name}: shard not listed in the manifest" for name in extra]
    return problems
