"""What the Zarr and WebDataset writers and readers share: block checks, group ranges, manifest.

Both formats record the same MANIFEST (see ``store_layout``) and compute the group ranges the
same way, so this lives in one place and the two format modules only deal with bytes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .blocks import ROLES, CellBlock, StoreMeta, StoreSpec
from .errors import DataValidationError
from .integrity import check_manifest_seal, corrupt, seal_manifest
from .remote import RemoteRoot, is_url, join
from .store_layout import FORMAT_VERSION, MANIFEST_NAME, SEALED_SINCE


def latentcell_version() -> str:
    try:
        return importlib_metadata.version("latentcell")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def check_spec(spec: StoreSpec) -> None:
    """Programming errors in the spec, caught before anything is written."""
    for col in ("gene_id", "gene_symbol"):
        if col not in spec.var.columns:
            raise ValueError(f"StoreSpec.var lacks column {col!r}")
    for role, col in spec.roles.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if col is not None and col not in spec.categories:
            raise ValueError(f"role {role!r} names {col!r}, which is not a categorical column")
    clash = set(spec.categories) & set(spec.numeric_dtypes)
    if clash:
        raise ValueError(f"columns both categorical and numeric: {sorted(clash)}")


def check_block(block: CellBlock, spec: StoreSpec) -> CellBlock:
    """Validate a block against the spec; returns it with canonical dtypes (float32/int32).

    Mismatches here are bugs in the caller (the build step validated the input already), so
    they raise ValueError rather than DataValidationError.
    """
    n_genes = len(spec.var)
    X = block.X
    if not sp.issparse(X) or X.format != "csr":
        X = sp.csr_matrix(X)
    if X.shape[1] != n_genes:
        raise ValueError(f"block has {X.shape[1]} genes, the store has {n_genes}")
    n = X.shape[0]
    if set(block.codes) != set(spec.categories):
        raise ValueError(f"block codes {sorted(block.codes)} != spec {sorted(spec.categories)}")
    if set(block.numeric) != set(spec.numeric_dtypes):
        raise ValueError(
            f"block numeric {sorted(block.numeric)} != spec {sorted(spec.numeric_dtypes)}"
        )
    if block.names is None:
        raise ValueError("block.names is required when writing a store")
    codes = {}
    for col, cats in spec.categories.items():
        c = np.asarray(block.codes[col])
        if c.size and (c.min() < -1 or c.max() >= len(cats)):
            raise ValueError(f"codes of {col!r} outside [-1, {len(cats)})")
        codes[col] = c.astype(np.int32, copy=False)
    numeric = {
        col: np.asarray(block.numeric[col]).astype(dt, copy=False)
        for col, dt in spec.numeric_dtypes.items()
    }
    fields = [block.library_size, block.names, *codes.values(), *numeric.values()]
    if any(len(f) != n for f in fields):
        raise ValueError("block obs fields differ in length from X")
    if X.data.dtype != np.float32 or X.indices.dtype != np.int32:
        X = sp.csr_matrix(
            (X.data.astype(np.float32), X.indices.astype(np.int32), X.indptr), shape=X.shape
        )
    return CellBlock(
        X=X,
        rows=np.asarray(block.rows),
        library_size=np.asarray(block.library_size, dtype=np.float32),
        codes=codes,
        numeric=numeric,
        names=np.asarray(block.names),
    )


class GroupRanges:
    """Runs of identical (cell_type, perturbation, batch) role codes, built block by block.

    A role without a column contributes -1. Runs are not split at input-file boundaries:
    consecutive rows of one group form one range wherever they came from.
    """

    def __init__(self, roles: dict[str, str | None]):
        self.columns = [roles.get(role) for role in ROLES]
        self._starts: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._last: np.ndarray | None = None
        self.n_cells = 0

    def add(self, codes: dict[str, np.ndarray], n: int) -> None:
        if n == 0:
            return
        key = np.stack(
            [
                codes[c].astype(np.int32) if c is not None else np.full(n, -1, np.int32)
                for c in self.columns
            ],
            axis=1,
        )
        new = np.empty(n, dtype=bool)
        new[0] = self._last is None or bool((key[0] != self._last).any())
        new[1:] = (key[1:] != key[:-1]).any(axis=1)
        idx = np.flatnonzero(new)
        self._starts.append(idx.astype(np.int64) + self.n_cells)
        self._keys.append(key[idx])
        self._last = key[-1].copy()
        self.n_cells += n

    def frame(self) -> pd.DataFrame:
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        keys = np.concatenate(self._keys) if self._keys else np.zeros((0, 3), np.int32)
        stops = np.append(starts[1:], self.n_cells)[: len(starts)].astype(np.int64)
        out = {role: keys[:, i].astype(np.int32) for i, role in enumerate(ROLES)}
        return pd.DataFrame({**out, "start": starts, "stop": stops})


def category_counts(spec: StoreSpec, counts: dict[str, np.ndarray], codes: dict) -> None:
    """Accumulate cells per category (code -1, a missing value, is not counted)."""
    for col, cats in spec.categories.items():
        c = codes[col]
        counts[col] += np.bincount(c[c >= 0], minlength=len(cats))[: len(cats)]


def base_manifest(
    fmt: str, spec: StoreSpec, n_cells: int, nnz: int, cat_counts: dict[str, np.ndarray]
) -> dict:
    var = spec.var
    return {
        "format": fmt,
        "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "latentcell_version": latentcell_version(),
        "n_cells": int(n_cells),
        "n_genes": len(var),
        "nnz": int(nnz),
        "var": {
            "gene_key": [str(k) for k in var.index],
            "gene_id": [str(v) for v in var["gene_id"]],
            "gene_symbol": [str(v) for v in var["gene_symbol"]],
        },
        "obs": {
            "categorical": {c: [str(x) for x in cats] for c, cats in spec.categories.items()},
            "numeric": {c: str(np.dtype(d)) for c, d in spec.numeric_dtypes.items()},
        },
        "roles": {role: spec.roles.get(role) for role in ROLES},
        "control_label": spec.control_label,
        "category_counts": {c: [int(x) for x in v] for c, v in cat_counts.items()},
        "inputs": spec.inputs,
        "build": spec.build_options,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    """The manifest, sealed with its own sha256 (``integrity``): written last by a build."""
    sealed = seal_manifest(json.loads(json.dumps(manifest, default=_json_default)))
    with open(directory / MANIFEST_NAME, "w") as f:
        json.dump(sealed, f, indent=1)
        f.write("\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at ``path`` (a directory or a URL, ``remote``), with errors
    that say what to do."""
    if is_url(path):
        return _read_remote_manifest(str(path))
    path = Path(path)
    if not path.exists():
        raise DataValidationError(
            path, "store", "no such file or directory", "pass the --out directory of a build"
        )
    if not path.is_dir():
        raise DataValidationError(
            path, "store", "not a directory", "pass the --out directory of a build"
        )
    mpath = path / MANIFEST_NAME
    if not mpath.exists():
        if ".tmp-" in path.name or (path / "zarr.json").exists() or any(path.glob("*.tar")):
            problem = f"incomplete store: no {MANIFEST_NAME} (an interrupted build never has one)"
            fix = "rebuild the store; delete this directory"
        else:
            problem = f"not a latentcell store: no {MANIFEST_NAME}"
            fix = "pass the --out directory of a build"
        raise DataValidationError(path, MANIFEST_NAME, problem, fix)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataValidationError(
            mpath, MANIFEST_NAME, f"unreadable ({exc})", "rebuild the store"
        ) from exc
    return _checked_manifest(manifest, mpath)


def _read_remote_manifest(url: str) -> dict:
    """``read_manifest`` for a URL: the same checks; a missing manifest is one line naming
    the URL (an object store has no directories to find missing, so the wording is wider)."""
    root = RemoteRoot(url)
    mpath = root.url_of(MANIFEST_NAME)
    try:
        raw = root.read(MANIFEST_NAME)
    except FileNotFoundError:
        if root.exists("zarr.json"):
            problem = f"incomplete store: no {MANIFEST_NAME} (an interrupted build never has one)"
            fix = "upload the whole store again, its manifest.json last"
        else:
            problem = f"no {MANIFEST_NAME}: no store at this URL"
            fix = "check the URL; pass the URL of a built store's directory"
        raise DataValidationError(root.url, MANIFEST_NAME, problem, fix) from None
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise DataValidationError(
            mpath, MANIFEST_NAME, f"unreadable ({exc})", "upload the store again"
        ) from exc
    return _checked_manifest(manifest, mpath)


def _checked_manifest(manifest, mpath) -> dict:
    """The manifest after its format, version and seal checks (local and remote alike)."""
    if not isinstance(manifest, dict) or manifest.get("format") not in (
        "zarr",
        "webdataset",
        "latent",
    ):
        raise DataValidationError(
            mpath, "format", "missing or unknown store format", "rebuild the store"
        )
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise corrupt(mpath, "version", f"{version!r} is not a store format version")
    if version > FORMAT_VERSION:
        raise DataValidationError(
            mpath,
            "version",
            f"store version {manifest.get('version')} is newer than this latentcell "
            f"understands ({FORMAT_VERSION})",
            "upgrade latentcell",
        )
    check_manifest_seal(manifest, mpath, sealed=version >= SEALED_SINCE)
    return manifest


def meta_from_manifest(manifest: dict, path: str, unit_sizes) -> StoreMeta:
    """The store's metadata, after checking the manifest's structure and that its counts agree
    with each other and with ``unit_sizes`` (what the format's own files say); a mismatch is
    a ``CorruptDataError`` naming manifest.json and the field."""
    mpath = join(path, MANIFEST_NAME)
    n_cells = manifest_int(manifest, "n_cells", mpath)
    n_genes = manifest_int(manifest, "n_genes", mpath)
    manifest_int(manifest, "nnz", mpath)
    sizes = np.asarray(unit_sizes, dtype=np.int64) if len(unit_sizes) else np.zeros(0, np.int64)
    if (sizes < 0).any() or int(sizes.sum()) != n_cells:
        raise corrupt(
            mpath, "n_cells", f"{n_cells} cells, but the read units hold {int(sizes.sum())}"
        )
    var = _section(manifest, "var", mpath)
    for key in ("gene_key", "gene_id", "gene_symbol"):
        values = var.get(key)
        if not isinstance(values, list) or len(values) != n_genes:
            raise corrupt(mpath, f"var.{key}", f"expected a list of {n_genes} gene names")
    obs = _section(manifest, "obs", mpath)
    categories = obs.get("categorical")
    numeric = obs.get("numeric")
    if not isinstance(categories, dict) or not all(
        isinstance(v, list) for v in categories.values()
    ):
        raise corrupt(mpath, "obs.categorical", "expected {column: [categories]}")
    if not isinstance(numeric, dict):
        raise corrupt(mpath, "obs.numeric", "expected {column: dtype}")
    roles = _section(manifest, "roles", mpath)
    for role, col in roles.items():
        if col is not None and col not in categories:
            raise corrupt(mpath, f"roles.{role}", f"names {col!r}, not a categorical column")
    counts = manifest.get("category_counts", {})
    for col, cats in categories.items():
        c = counts.get(col) if isinstance(counts, dict) else None
        if c is not None and (
            not isinstance(c, list) or len(c) != len(cats) or sum(int(x) for x in c) > n_cells
        ):
            raise corrupt(
                mpath, f"category_counts.{col}", "does not fit the categories and n_cells"
            )
    frame = pd.DataFrame(
        {"gene_id": var["gene_id"], "gene_symbol": var["gene_symbol"]},
        index=pd.Index(var["gene_key"], name="gene_key"),
    )
    return StoreMeta(
        format=manifest["format"],
        path=str(path),
        n_cells=n_cells,
        n_genes=n_genes,
        var=frame,
        categories={c: list(v) for c, v in categories.items()},
        numeric_columns=list(numeric),
        roles=dict(roles),
        control_label=manifest.get("control_label"),
        unit_sizes=sizes,
        manifest=manifest,
    )


def manifest_int(manifest: dict, key: str, mpath: Path, minimum: int = 0) -> int:
    """``manifest[key]`` as an int >= ``minimum``, or a CorruptDataError naming the field."""
    value = manifest.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise corrupt(mpath, key, f"{value!r} is not an integer >= {minimum}")
    return value


def _section(manifest: dict, key: str, mpath: Path) -> dict:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise corrupt(mpath, key, "missing or not an object")
    return value


def check_group_index(groups: pd.DataFrame, meta: StoreMeta, source: str | Path) -> pd.DataFrame:
    """Group ranges must tile [0, n_cells) in order, with role codes inside their categories:
    the set samplers index rows with them, so a bad range would read the wrong cells."""
    starts, stops = groups["start"].to_numpy(), groups["stop"].to_numpy()
    n = meta.n_cells
    tiled = (
        (len(starts) == 0 and n == 0)
        or len(starts)
        and starts[0] == 0
        and stops[-1] == n
        and (stops > starts).all()
        and (starts[1:] == stops[:-1]).all()
    )
    if not tiled:
        raise corrupt(source, "groups", f"the group ranges do not tile rows [0, {n})")
    for role in ROLES:
        col = meta.roles.get(role)
        codes = groups[role].to_numpy()
        limit = len(meta.categories[col]) if col is not None else 0
        if len(codes) and (codes.min() < -1 or codes.max() >= limit):
            raise corrupt(source, f"groups.{role}", "role codes outside the categories")
    return groups


def check_row_range(start: int, stop: int, n_cells: int) -> None:
    if not (0 <= start <= stop <= n_cells):
        raise IndexError(f"rows [{start}, {stop}) outside [0, {n_cells})")
