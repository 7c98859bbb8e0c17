"""``latentcell data inspect`` and ``verify``: what is in a store, and is it intact."""

from __future__ import annotations

import argparse
import json

from latentcell.data_pipelines.stores import open_store, verify_store


def summarize_store(path: str) -> dict:
    """The store's shape and schema, read from its manifest (no counts are read)."""
    reader = open_store(path)
    meta = reader.meta
    groups = reader.group_index()
    role_cols = [r for r in ("cell_type", "perturbation", "batch") if r in groups.columns]
    n_groups = int(groups[role_cols].drop_duplicates().shape[0]) if len(groups) else 0
    public = [c for c in meta.obs_columns if not c.startswith("_")]
    return {
        "path": str(meta.path),
        "format": meta.format,
        "n_cells": int(meta.n_cells),
        "n_genes": int(meta.n_genes),
        "nnz": int(meta.manifest.get("nnz", -1)),
        "obs_columns": public,
        "roles": meta.roles,
        "control_label": meta.control_label,
        "n_groups": n_groups,
        "n_units": int(len(meta.unit_sizes)),
        "categories": {
            c: len(meta.categories[c]) for c in meta.categories if not c.startswith("_")
        },
        "inputs": meta.manifest.get("inputs", []),
        "format_version": int(meta.manifest["version"]),
        # what reads check (``integrity``): version 1 stores predate the checks
        "integrity": "checksummed units, sealed manifest"
        if "manifest_sha256" in meta.manifest
        else "none (built before format version 2: rebuild for read-time checks)",
    }


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "store", help="path or URL (s3://, gs://, https://) of a Zarr or WebDataset store"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run_inspect(args: argparse.Namespace) -> int:
    summary = summarize_store(args.store)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key in ("path", "format", "n_cells", "n_genes", "nnz", "n_groups", "n_units", "integrity"):
        print(f"{key:>13}: {summary[key]}")
    print(f"{'roles':>13}: {summary['roles']} (control: {summary['control_label']})")
    for col, n in summary["categories"].items():
        print(f"{'obs':>13}: {col} ({n} categories)")
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "store", help="path or URL (s3://, gs://, https://) of a Zarr or WebDataset store"
    )


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_store(args.store)
    for problem in problems:
        print(f"error: {problem}")
    if not problems:
        print(f"ok: {args.store}: every checksum matches its manifest")
    return 1 if problems else 0
