"""The package-level import graph, computed from the source: no two packages import each
other, and library code never imports the entrypoints (benchmarks, launch)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipelines", "models", "inference", "trainer", "families", "evaluation",
            "export", "benchmarks", "launch")  # fmt: skip
ENTRYPOINTS = {"benchmarks", "launch"}


def import_graph() -> dict[str, set[str]]:
    """package -> the latentcell packages its modules import (module-level or in functions)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "latentcell" and len(parts) > 1 and parts[1] != package:
                        edges[package].add(parts[1])
    return edges


def test_every_package_is_scanned():
    assert {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"} == set(PACKAGES)


def test_no_two_packages_import_each_other():
    edges = import_graph()
    both = sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert both == []


def test_library_code_never_imports_entrypoints():
    edges = import_graph()
    bad = {p: edges[p] & ENTRYPOINTS for p in PACKAGES if p not in ENTRYPOINTS}
    assert {p: e for p, e in bad.items() if e} == {}
    assert "launch" not in edges["benchmarks"]
