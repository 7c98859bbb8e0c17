"""One part of a distributed build: one input file written by one Dask worker, and its marker.

A part is what ``build_store`` would write for that input alone, with the store-wide plan
(categories, stored genes, the input's position): a complete store of the build's format at
``<out>.parts/part-<index>``, published by the writer's own rename, so a worker killed
mid-part leaves only a ``part-<index>.tmp-*`` directory (removed by the next attempt, see
``atomic.remove_stale_builds``). Its sealed manifest is the completion marker: it records
the part's ``key``, a digest of everything the part's bytes depend on (the input's path,
size and modification time, its index and, for WebDataset, its first row; the store-wide
plan; the writer options). A re-run reuses a part whose marker is intact and whose key is
unchanged, and rewrites any other, so only missing, failed or changed parts are redone.

WebDataset parts carry global rows (``first_row``) and prefixed shard names, so the merge
links their shards into the store unchanged; Zarr parts are ordinary local stores whose
arrays the merge copies chunk range by chunk range (``merge_parts``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .blocks import StoreSpec
from .build import ObsPlan, WriteSettings, write_input
from .errors import DataValidationError
from .h5ad_input import OrderedReadPlan, open_input
from .schemas import Schema
from .store_common import read_manifest
from .store_layout import MANIFEST_NAME
from .vocabulary import Vocabulary


@dataclass(frozen=True)
class SharedPlan:
    """What every part needs (sent to each worker once)."""

    schema: Schema
    obs: ObsPlan
    stored: Vocabulary
    spec: StoreSpec
    format: str
    writer_opts: dict
    settings: WriteSettings


@dataclass(frozen=True)
class PartTask:
    """One input's part: where it goes and the key its finished marker must carry."""

    index: int
    path: str
    fingerprint: dict
    first_row: int
    input_keys: np.ndarray
    read_plan: OrderedReadPlan
    key: str
    part_dir: str


def fingerprint(path: str) -> dict:
    """What identifies an input's content cheaply (as make does): size and mtime in ns."""
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_digest(shared: SharedPlan) -> str:
    """sha256 of the store-wide plan every part's bytes depend on (not the build's timings)."""
    spec = shared.spec
    body = {
        "format": shared.format,
        "writer": shared.writer_opts,
        "settings": {k: v for k, v in asdict(shared.settings).items() if k != "spill_dir"},
        "var": [list(map(str, spec.var.index)), *(list(map(str, spec.var[c]))
                                                  for c in ("gene_id", "gene_symbol"))],
        "categories": spec.categories,
        "numeric": spec.numeric_dtypes,
        "roles": spec.roles,
        "control": spec.control_label,
    }  # fmt: skip
    return _sha(body)


def part_key(shared_digest: str, fmt: str, index: int, fp: dict, first_row: int, mode: str) -> str:
    """The key a part's marker must carry to be reused (see the module docstring)."""
    body = {"plan": shared_digest, "index": index, "input": fp, "read_mode": mode}
    if fmt == "webdataset":  # its shards hold global rows; a Zarr part's rows are local
        body["first_row"] = first_row
    return _sha(body)


def _sha(body) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_part(task: PartTask, shared: SharedPlan) -> dict:
    """Reuse the finished part at ``task.part_dir`` or write it; returns its summary."""
    done = finished_part(task, shared.format)
    if done is not None:
        return {**done, "reused": True}
    from .stores import make_writer

    inp = open_input(task.path, shared.schema)
    try:
        if fingerprint(task.path) != task.fingerprint:
            raise DataValidationError(task.path, "input", "changed while the build ran",
                                      "run the build again")  # fmt: skip
        spec = replace(
            shared.spec,
            inputs=[shared.spec.inputs[task.index]],
            build_options={"part": {"index": task.index, "key": task.key}},
        )
        opts = dict(shared.writer_opts)
        if shared.format == "webdataset":
            opts.update(first_row=task.first_row, shard_prefix=f"part-{task.index:06d}-")
        with make_writer(shared.format, task.part_dir, spec, overwrite=True, **opts) as writer:
            settings = shared.settings
            if not settings.spill_dir:  # a killed part's spill files go with its directory
                settings = replace(settings, spill_dir=str(writer.scratch))
            write_input(inp, task.index, shared.obs, task.input_keys, shared.stored,
                        task.read_plan, writer, settings)  # fmt: skip
            writer.finish()
    finally:
        inp.close()
    done = finished_part(task, shared.format)
    if done is None:  # pragma: no cover - the writer just published it
        raise RuntimeError(f"part {task.part_dir} was written but does not read back")
    return {**done, "reused": False}


def finished_part(task: PartTask, fmt: str) -> dict | None:
    """The summary of the part at ``task.part_dir`` when it is finished with ``task.key``
    (sealed manifest, same key, its files present); None when it must be (re)written."""
    root = Path(task.part_dir)
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(root)
        if manifest["build"].get("part", {}).get("key") != task.key:
            return None
        summary = {
            "index": task.index,
            "part_dir": str(root),
            "n_cells": int(manifest["n_cells"]),
            "nnz": int(manifest["nnz"]),
            "category_counts": manifest["category_counts"],
        }
        if fmt == "webdataset":
            shards = manifest["shards"]
            for shard in shards:
                path = root / shard["name"]
                if not path.is_file() or path.stat().st_size != shard["bytes"]:
                    return None
            return {**summary, "shards": shards, "groups": manifest["groups"],
                    "block_cells": manifest["block_cells"]}  # fmt: skip
        from .zarr_store import ZarrStoreReader

        groups = ZarrStoreReader(root).group_index()  # also checks the arrays' shapes
        return {**summary, "groups": {c: groups[c].tolist() for c in groups.columns},
                "nnz_chunk": manifest["nnz_chunk"]}  # fmt: skip
    except (DataValidationError, KeyError, TypeError, ValueError, OSError):
        return None
