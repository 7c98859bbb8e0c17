"""Train / val / test splits of one store for perturbation prediction (ST set models).

A set model maps control cells + a perturbation to the perturbed population, so a split must
say which *perturbed* cells are held out and which *controls* the held-out predictions start
from. Three rules, combinable in one file:

``[split.cells]`` (held-out cells, iid)
    In every (cell type, perturbation) group, controls included, a seeded fraction of the
    cells goes to val and to test. Held-out controls are what test predictions start from,
    so the model never saw the basal cells it is evaluated on. The choice is per cell: the
    group's rows are permuted by (seed, cell type code, perturbation code) and the first
    ``round(test_fraction * n)`` go to test, the next ``round((val_fraction + test_fraction)
    * n) - n_test`` to val. (Groups are sorted by batch inside, so a contiguous tail would
    hold out whole batches.) Every group keeps at least one training cell. Groups held out
    whole by another rule are left as that rule put them.
``[split.perturbations]`` (held-out perturbations, zero-shot)
    Every cell of the listed perturbations (or of ``n_test`` / ``n_val`` perturbations picked
    by seed among those with cells in scope) goes to test / val, optionally only in some cell
    types (``cell_types``; default all). Their controls are NOT held out by this rule: a
    zero-shot prediction starts from training controls. Repeat the table
    (``[[split.perturbations]]``) for different lists per cell type.
``[split.cell_types]`` (held-out cell types)
    Every cell of the listed cell types, controls included, goes to test / val.

When rules disagree the cell goes to the strictest split (test > val > train): a test label
is then never seen in training or in model selection.

Schema
------
.. code-block:: toml

    [split]
    seed = 0                          # int >= 0; drives every random choice

    [split.cells]                     # iid
    val_fraction = 0.1                # each in [0, 1), sum < 1
    test_fraction = 0.2

    [split.perturbations]             # zero-shot perturbations
    test = ["TP53", "MYC"]            # labels of the perturbation column ...
    n_val = 2                         # ... and/or counts picked by seed (not both per split)
    cell_types = ["K562"]             # optional scope; default every cell type

    [split.cell_types]                # held-out cell types
    test = ["HepG2"]
    val = []

At least one rule must hold something out. Unknown keys are errors (a typo would otherwise
silently hold out nothing).

Cell-load files
---------------
Arc's cell-load split files are read too, and translated into the rules above:
``[zeroshot] "<dataset>.<cell type>" = "val" | "test"`` becomes ``[split.cell_types]``, and
``[fewshot."<dataset>.<cell type>"] val = [...], test = [...]`` becomes a
``[[split.perturbations]]`` rule scoped to that cell type (held-out controls are not implied,
as everywhere here). ``[datasets]`` names are stripped from the keys (a bare cell type works
too); ``[training]`` is ignored: all cells not held out train. The two styles may be combined.
Our own names avoid ``zeroshot`` / ``fewshot`` because cell-load uses "zeroshot" for held-out
*cell types*, while in perturbation modelling "zero-shot" usually means an unseen
*perturbation*; ``cells`` / ``perturbations`` / ``cell_types`` say what is held out.

Bad files raise ``DataValidationError`` naming the TOML file, the field and the fix; names
that do not occur in the store are reported with the available ones (at ``assign_split``).

Output
------
``assign_split(reader, config)`` returns a ``PerturbationSplit``: sorted int64 row arrays
``train`` / ``val`` / ``test`` (disjoint, covering every row), the held-out labels and a
``to_json()`` summary (cells, controls and perturbations per split). It is computed from the
store's ``group_index()`` and role categories alone, no count is read, and it depends only on
(store layout, codes, config): every rank and every resumed run agrees on it. Pass
``split.train`` as ``SetSampler(..., rows=split.train)`` so that no val/test cell is ever a
perturbed cell or a control in training.

One file for every stage: ``train st``, ``train vae`` and ``train dit`` (``split.file``),
``latentcell data split`` (the parts as h5ad files, ``split_files``) and ``latentcell predict
--baseline --split`` all call ``assign_split`` on the same store and file, so they agree row
for row. ``save_split`` writes what a run keeps (``split.npz``: the rows of each part;
``split.json``: the summary).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .blocks import StoreReader
from .errors import DataValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "SPLITS",
    "CellHoldout",
    "CellTypeHoldout",
    "PerturbationHoldout",
    "PerturbationSplit",
    "SplitConfig",
    "assign_split",
    "control_code",
    "load_split_config",
    "read_split_rows",
    "save_split",
]

SPLITS = ("train", "val", "test")
SPLIT_ROWS, SPLIT_SUMMARY = "split.npz", "split.json"  # what a run keeps of its split
_TRAIN, _VAL, _TEST = 0, 1, 2
CONFIG_PATH = "<split config>"

# Tags that keep the random streams of different decisions independent.
_IID, _PICK = 0, 1


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class CellHoldout:
    """``[split.cells]``: iid fractions of every (cell type, perturbation) group."""

    val_fraction: float = 0.0
    test_fraction: float = 0.0


@dataclass(frozen=True)
class PerturbationHoldout:
    """One ``[split.perturbations]`` rule: perturbations held out whole (zero-shot).

    test / val: labels; n_test / n_val: further perturbations picked by seed among those
    with cells in scope. cell_types: the scope (None = every cell type).
    """

    test: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    n_test: int = 0
    n_val: int = 0
    cell_types: tuple[str, ...] | None = None
    origin: str = field(default="split.perturbations", compare=False)  # named in errors


@dataclass(frozen=True)
class CellTypeHoldout:
    """``[split.cell_types]``: cell types held out whole, controls included."""

    test: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    origin: str = field(default="split.cell_types", compare=False)  # named in errors


@dataclass(frozen=True)
class SplitConfig:
    """A parsed split file; ``path`` is the file named in error messages."""

    seed: int = 0
    cells: CellHoldout | None = None
    perturbations: tuple[PerturbationHoldout, ...] = ()
    cell_types: CellTypeHoldout | None = None
    path: str = CONFIG_PATH

    def to_dict(self) -> dict:
        """The rules as plain data (the ``[split]`` table of an equivalent native file)."""
        out: dict[str, Any] = {"seed": self.seed}
        if self.cells is not None:
            out["cells"] = asdict(self.cells)
        if self.perturbations:
            out["perturbations"] = [
                {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(r).items()
                    if k != "origin"
                }
                for r in self.perturbations
            ]
        if self.cell_types is not None:
            types = self.cell_types
            out["cell_types"] = {"test": list(types.test), "val": list(types.val)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | Path = CONFIG_PATH) -> SplitConfig:
        """From a parsed TOML document (native ``[split]`` and/or cell-load tables)."""
        return _Parser(str(path)).parse(data)


def load_split_config(path: str | Path) -> SplitConfig:
    """Read and validate a split TOML file (see the module docstring for the schema)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            path, "file", "no such split file", "pass the path of an existing TOML split file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DataValidationError(
            path, "toml", f"not valid TOML ({err})", "fix the TOML syntax"
        ) from None
    return SplitConfig.from_dict(data, path)


_TOP_KEYS = ("split", "datasets", "training", "zeroshot", "fewshot")
_SPLIT_KEYS = ("seed", "cells", "perturbations", "cell_types")
_CELLS_KEYS = ("val_fraction", "test_fraction")
_PERT_KEYS = ("test", "val", "n_test", "n_val", "cell_types")
_TYPE_KEYS = ("test", "val")


class _Parser:
    """Validates a TOML document field by field; every error names the file and field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, field: str, problem: str, fix: str) -> DataValidationError:
        return DataValidationError(self.path, field, problem, fix)

    def table(self, value: Any, field: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field, f"expected a table, got {value!r}", f"write [{field}]")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.fail(
                f"{field}.{unknown[0]}",
                "unknown key",
                f"use only {list(allowed)}{_did_you_mean(unknown[0], allowed)}",
            )
        return value

    def labels(self, value: Any, field: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(field, f"expected a list of strings, got {value!r}", 'write ["A", ...]')
        seen: set[str] = set()
        dupes = [v for v in value if v in seen or seen.add(v)]
        if dupes:
            raise self.fail(field, f"{dupes[0]!r} is listed twice", "list each label once")
        return tuple(value)

    def count(self, value: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(field, f"expected an integer >= 0, got {value!r}", "write e.g. 5")
        return value

    def fraction(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"expected a number, got {value!r}", "write e.g. 0.1")
        if not 0.0 <= value < 1.0 or math.isnan(value):
            raise self.fail(field, f"{value} is outside [0, 1)", "use a fraction such as 0.1")
        return float(value)

    def parse(self, data: Mapping[str, Any]) -> SplitConfig:
        self.table(data, "<top level>", _TOP_KEYS)
        split = self.table(data.get("split", {}), "split", _SPLIT_KEYS)
        seed = self.count(split.get("seed", 0), "split.seed")
        cells = self.cells(split["cells"]) if "cells" in split else None
        rules = split.get("perturbations", [])
        if isinstance(rules, Mapping):
            rules = [rules]
        if not isinstance(rules, list):
            raise self.fail(
                "split.perturbations", "expected a table", "write [split.perturbations]"
            )
        perturbations = [
            self.perturbation_rule(r, "split.perturbations" + (f"[{i}]" if len(rules) > 1 else ""))
            for i, r in enumerate(rules)
        ]
        types = self.cell_types(split["cell_types"]) if "cell_types" in split else None
        zero_types, few_rules = self.cell_load(data)
        perturbations += few_rules
        if zero_types is not None:
            types = zero_types if types is None else self.merge_types(types, zero_types)
        config = SplitConfig(seed, cells, tuple(perturbations), types, self.path)
        if not _holds_out_anything(config):
            raise self.fail(
                "split",
                "no rule holds anything out (every cell would train)",
                "add [split.cells] fractions, [split.perturbations] or [split.cell_types] "
                "(see latentcell.data_pipelines.perturbation_splits)",
            )
        return config

    def cells(self, value: Any) -> CellHoldout:
        table = self.table(value, "split.cells", _CELLS_KEYS)
        val = self.fraction(table.get("val_fraction", 0.0), "split.cells.val_fraction")
        test = self.fraction(table.get("test_fraction", 0.0), "split.cells.test_fraction")
        if val + test >= 1.0:
            raise self.fail(
                "split.cells",
                f"val_fraction + test_fraction = {val + test:g} leaves no training cells",
                "make the two fractions sum to less than 1",
            )
        return CellHoldout(val, test)

    def perturbation_rule(self, value: Any, field: str) -> PerturbationHoldout:
        table = self.table(value, field, _PERT_KEYS)
        test = self.labels(table.get("test", []), f"{field}.test")
        val = self.labels(table.get("val", []), f"{field}.val")
        n_test = self.count(table.get("n_test", 0), f"{field}.n_test")
        n_val = self.count(table.get("n_val", 0), f"{field}.n_val")
        for name, labels, n in (("test", test, n_test), ("val", val, n_val)):
            if labels and n:
                raise self.fail(
                    f"{field}.n_{name}",
                    f"both {name} (a list) and n_{name} (a count) are given",
                    "give either the labels or how many to pick by seed",
                )
        both = sorted(set(test) & set(val))
        if both:
            raise self.fail(
                f"{field}.val", f"{both} are listed in both val and test", "list each in one split"
            )
        scope = table.get("cell_types")
        scope = None if scope is None else self.labels(scope, f"{field}.cell_types")
        if scope == ():
            raise self.fail(
                f"{field}.cell_types", "empty list", "list cell types, or drop the key for all"
            )
        return PerturbationHoldout(test, val, n_test, n_val, scope, origin=field)

    def cell_types(self, value: Any) -> CellTypeHoldout:
        table = self.table(value, "split.cell_types", _TYPE_KEYS)
        test = self.labels(table.get("test", []), "split.cell_types.test")
        val = self.labels(table.get("val", []), "split.cell_types.val")
        both = sorted(set(test) & set(val))
        if both:
            raise self.fail(
                "split.cell_types.val", f"{both} are listed in both val and test",
                "list each cell type in one split",
            )  # fmt: skip
        return CellTypeHoldout(test, val)

    def merge_types(self, a: CellTypeHoldout, b: CellTypeHoldout) -> CellTypeHoldout:
        test = a.test + tuple(t for t in b.test if t not in a.test)
        val = a.val + tuple(t for t in b.val if t not in a.val)
        both = sorted(set(test) & set(val))
        if both:
            raise self.fail(
                "zeroshot", f"{both} are held out as both val and test",
                "hold each cell type out in one split",
            )  # fmt: skip
        return CellTypeHoldout(test, val)

    # -- cell-load ----------------------------------------------------------------------

    def cell_load(
        self, data: Mapping[str, Any]
    ) -> tuple[CellTypeHoldout | None, list[PerturbationHoldout]]:
        """``[zeroshot]`` / ``[fewshot]`` tables as our rules (``[training]`` is ignored)."""
        datasets = data.get("datasets", {})
        if not isinstance(datasets, Mapping):
            raise self.fail("datasets", "expected a table", "write [datasets] name = path")
        prefixes = sorted((f"{name}." for name in datasets), key=len, reverse=True)

        def cell_type(key: str) -> str:
            return next((key[len(p) :] for p in prefixes if key.startswith(p)), key)

        types: CellTypeHoldout | None = None
        if "zeroshot" in data:
            zeroshot = data["zeroshot"]
            if not isinstance(zeroshot, Mapping):
                raise self.fail(
                    "zeroshot", "expected a table", 'write [zeroshot] "ds.type" = "test"'
                )
            test, val = [], []
            for key, where in zeroshot.items():
                if where not in ("val", "test"):
                    raise self.fail(
                        f'zeroshot."{key}"', f"{where!r} is not a held-out split",
                        'write "val" or "test" (cells not held out train anyway)',
                    )  # fmt: skip
                (test if where == "test" else val).append(cell_type(key))
            types = CellTypeHoldout(tuple(test), tuple(val), origin="zeroshot")
        rules = []
        fewshot = data.get("fewshot", {})
        if not isinstance(fewshot, Mapping):
            raise self.fail("fewshot", "expected a table", 'write [fewshot."dataset.cell type"]')
        for key, value in fewshot.items():
            rule = self.perturbation_rule(value, f'fewshot."{key}"')
            scope = (cell_type(key),)
            rules.append(PerturbationHoldout(rule.test, rule.val, 0, 0, scope, origin=rule.origin))
        return types, rules


def _holds_out_anything(config: SplitConfig) -> bool:
    cells = config.cells
    if cells is not None and cells.val_fraction + cells.test_fraction > 0:
        return True
    if config.cell_types is not None and (config.cell_types.test or config.cell_types.val):
        return True
    return any(r.test or r.val or r.n_test or r.n_val for r in config.perturbations)


# -- the split ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationSplit:
    """Rows of each split (sorted int64, disjoint, covering the store) and what was held out.

    test_perturbations / val_perturbations: labels held out whole by a perturbation rule (in
    the rule's cell types), including those picked by seed. test_cell_types /
    val_cell_types: cell types held out whole. summary: see ``to_json``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_perturbations: tuple[str, ...]
    val_perturbations: tuple[str, ...]
    test_cell_types: tuple[str, ...]
    val_cell_types: tuple[str, ...]
    summary: dict = field(repr=False)

    def rows(self, split: str) -> np.ndarray:
        """The rows of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def to_json(self, indent: int | None = 2) -> str:
        """The summary as JSON: config, held-out labels, per split cells, controls, groups and
        perturbation labels."""
        return json.dumps(self.summary, indent=indent)


class _Names:
    """Label <-> code for one role column of the store, with helpful unknown-name errors."""

    def __init__(self, meta, role: str, config: SplitConfig, field: str):
        column = meta.roles.get(role)
        if column is None:
            raise DataValidationError(
                config.path,
                field,
                f"the store {meta.path} has no {role} column",
                f"rebuild the store with a {role} column, or drop this rule",
            )
        self.labels: list[str] = list(meta.categories[column])
        self.codes = {label: i for i, label in enumerate(self.labels)}
        self.role, self.path = role, config.path

    def code(self, label: str, field: str) -> int:
        if label not in self.codes:
            raise DataValidationError(
                self.path,
                field,
                f"{self.role.replace('_', ' ')} {label!r} does not occur in the store",
                f"use one of {_preview(self.labels)}{_did_you_mean(label, self.labels)}",
            )
        return self.codes[label]


def assign_split(
    reader: StoreReader | str | Path, config: SplitConfig | str | Path
) -> PerturbationSplit:
    """Assign every row of a store to train / val / test (no counts are read).

    reader: an open store or its path; config: a ``SplitConfig`` or the path of a split file.
    """
    if isinstance(reader, (str, Path)):
        from .stores import open_store

        reader = open_store(reader)
    if not isinstance(config, SplitConfig):
        config = load_split_config(config)
    meta = reader.meta
    index = reader.group_index().sort_values("start", kind="stable").reset_index(drop=True)
    ct = index["cell_type"].to_numpy(np.int64)
    pt = index["perturbation"].to_numpy(np.int64)
    starts = index["start"].to_numpy(np.int64)
    stops = index["stop"].to_numpy(np.int64)
    sizes = stops - starts
    # per range: the strictest split any whole-group rule gives it
    range_label = np.zeros(len(index), dtype=np.int8)
    control = control_code(meta)

    held: dict[str, list[str]] = {k: [] for k in ("test_pt", "val_pt", "test_ct", "val_ct")}
    if config.cell_types is not None:
        origin = config.cell_types.origin
        names = _Names(meta, "cell_type", config, origin)
        for label_value, listed, key in (
            (_TEST, config.cell_types.test, "test"),
            (_VAL, config.cell_types.val, "val"),
        ):
            codes = [names.code(t, f"{origin}.{key}") for t in listed]
            np.maximum(range_label, np.where(np.isin(ct, codes), label_value, 0), out=range_label)
            held[f"{key}_ct"] += [t for t in listed if t not in held[f"{key}_ct"]]

    for k, rule in enumerate(config.perturbations):
        field_ = rule.origin
        perts = _Names(meta, "perturbation", config, field_)
        if rule.cell_types is None:
            in_scope = np.ones(len(index), dtype=bool)
        else:
            types = _Names(meta, "cell_type", config, f"{field_}.cell_types")
            scope = [types.code(t, f"{field_}.cell_types") for t in rule.cell_types]
            in_scope = np.isin(ct, scope)
        chosen = {}
        for key in ("test", "val"):
            codes = []
            for label in getattr(rule, key):
                code = perts.code(label, f"{field_}.{key}")
                if code == control:
                    raise DataValidationError(
                        config.path,
                        f"{field_}.{key}",
                        f"{label!r} is the control label; a perturbation rule never holds "
                        "out controls",
                        "remove it; hold controls out with [split.cells] (held-out controls "
                        "for test predictions) or [split.cell_types]",
                    )
                codes.append(code)
            chosen[key] = codes
        _pick_by_seed(rule, chosen, pt[in_scope & (sizes > 0)], control, config, k, field_)
        for label_value, key in ((_TEST, "test"), (_VAL, "val")):
            hit = in_scope & np.isin(pt, chosen[key])
            np.maximum(range_label, np.where(hit, label_value, 0), out=range_label)
            for code in chosen[key]:
                if perts.labels[code] not in held[f"{key}_pt"]:
                    held[f"{key}_pt"].append(perts.labels[code])

    label = _row_labels(range_label, starts, stops, meta.n_cells)
    if config.cells is not None and config.cells.val_fraction + config.cells.test_fraction > 0:
        _iid(label, index, range_label, config)

    rows = {name: np.flatnonzero(label == i).astype(np.int64) for i, name in enumerate(SPLITS)}
    if len(rows["train"]) == 0:
        raise DataValidationError(
            config.path,
            "split",
            f"every one of the {meta.n_cells} cells of {meta.path} is held out",
            "hold out fewer cell types, perturbations or cells",
        )
    summary = _summary(meta, index, label, config, held, control)
    return PerturbationSplit(
        train=rows["train"],
        val=rows["val"],
        test=rows["test"],
        test_perturbations=tuple(held["test_pt"]),
        val_perturbations=tuple(held["val_pt"]),
        test_cell_types=tuple(held["test_ct"]),
        val_cell_types=tuple(held["val_ct"]),
        summary=summary,
    )


def save_split(split: PerturbationSplit, directory: str | Path) -> Path:
    """``split.npz`` (int64 rows of train / val / test) and ``split.json`` (the summary) in
    ``directory``, each written to a temporary file and renamed; returns the npz path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = directory / SPLIT_ROWS
    tmp = directory / f".{SPLIT_ROWS}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, train=split.train, val=split.val, test=split.test)
        tmp.replace(rows)
    finally:
        tmp.unlink(missing_ok=True)
    summary = directory / SPLIT_SUMMARY
    tmp = directory / f".{SPLIT_SUMMARY}.tmp-{os.getpid()}"
    try:
        tmp.write_text(split.to_json())
        tmp.replace(summary)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def read_split_rows(path: str | Path) -> dict[str, np.ndarray]:
    """The rows of each split from a ``split.npz`` (``save_split``, or a ``train st`` run's)."""
    with np.load(path) as f:
        return {k: np.asarray(f[k], dtype=np.int64) for k in SPLITS}


def control_code(meta) -> int | None:
    """The code of the store's control label in its perturbation column (None: no controls)."""
    column, label = meta.roles.get("perturbation"), meta.control_label
    if column is None or label is None or label not in meta.categories[column]:
        return None
    return meta.categories[column].index(label)


def _pick_by_seed(
    rule: PerturbationHoldout,
    chosen: dict[str, list[int]],
    present: np.ndarray,
    control: int | None,
    config: SplitConfig,
    k: int,
    field_: str,
) -> None:
    """Add ``n_test`` then ``n_val`` perturbations picked by (seed, rule) to ``chosen``."""
    if not (rule.n_test or rule.n_val):
        return
    taken = set(chosen["test"]) | set(chosen["val"])
    pool = np.array(
        [p for p in np.unique(present) if p >= 0 and p != control and p not in taken], np.int64
    )
    need = rule.n_test + rule.n_val
    if need > len(pool):
        raise DataValidationError(
            config.path,
            f"{field_}.n_test",
            f"n_test + n_val = {need} but only {len(pool)} perturbations (besides the "
            "control and those listed) have cells in scope",
            f"ask for at most {len(pool)}",
        )
    picked = np.random.default_rng([config.seed, _PICK, k]).permutation(pool)
    chosen["test"] += sorted(int(p) for p in picked[: rule.n_test])
    chosen["val"] += sorted(int(p) for p in picked[rule.n_test : need])


def _row_labels(
    range_label: np.ndarray, starts: np.ndarray, stops: np.ndarray, n_cells: int
) -> np.ndarray:
    """Per-row labels from per-range labels (rows outside every range, none in a valid
    store, train)."""
    tiles = len(starts) and starts[0] == 0 and stops[-1] == n_cells
    if tiles and (starts[1:] == stops[:-1]).all():
        return np.repeat(range_label, stops - starts)
    rows = np.zeros(n_cells, dtype=np.int8)
    for a, b, v in zip(starts, stops, range_label, strict=True):
        rows[a:b] = v
    return rows


def _iid(label: np.ndarray, index: pd.DataFrame, range_label: np.ndarray, config: SplitConfig):
    """Per (cell type, perturbation) group not held out whole: seeded per-cell val/test."""
    f_test, f_val = config.cells.test_fraction, config.cells.val_fraction
    free = index[range_label == _TRAIN]
    for (ct, pt), frame in free.groupby(["cell_type", "perturbation"], sort=True):
        a = frame["start"].to_numpy(np.int64)
        b = frame["stop"].to_numpy(np.int64)
        n = int((b - a).sum())
        if n < 2:
            continue  # every group keeps a training cell
        rows = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in zip(a, b, strict=True)])
        n_held = min(_round(f_test + f_val, n), n - 1)
        n_test = min(_round(f_test, n), n_held)
        perm = np.random.default_rng([config.seed, _IID, int(ct) + 1, int(pt) + 1]).permutation(n)
        label[rows[perm[:n_test]]] = _TEST
        label[rows[perm[n_test:n_held]]] = _VAL


def _round(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def _summary(meta, index, label, config, held, control) -> dict:
    """Cells, controls, groups, cell types and perturbation labels per split."""
    starts = index["start"].to_numpy(np.int64)
    stops = index["stop"].to_numpy(np.int64)
    counts = np.zeros((len(index), len(SPLITS)), dtype=np.int64)
    for i in range(len(SPLITS)):
        cum = np.concatenate([[0], np.cumsum(label == i)])
        counts[:, i] = cum[stops] - cum[starts]
    frame = pd.DataFrame(counts, columns=list(SPLITS))
    frame["cell_type"] = index["cell_type"].to_numpy()
    frame["perturbation"] = index["perturbation"].to_numpy()
    by_group = frame.groupby(["cell_type", "perturbation"], sort=True)[list(SPLITS)].sum()
    pert_col = meta.roles.get("perturbation")
    type_col = meta.roles.get("cell_type")

    def name(column, code):
        return None if column is None or code < 0 else meta.categories[column][code]

    splits = {}
    for s in SPLITS:
        groups = by_group[by_group[s] > 0]
        pts = groups.index.get_level_values("perturbation").to_numpy()
        cts = groups.index.get_level_values("cell_type").to_numpy()
        is_ctrl = pts == control if control is not None else np.zeros(len(pts), bool)
        perturbed = ~is_ctrl & (pts >= 0)
        labels = sorted({name(pert_col, int(p)) for p in np.unique(pts[perturbed])})
        splits[s] = {
            "cells": int(groups[s].sum()),
            "control_cells": int(groups[s][is_ctrl].sum()),
            "perturbed_cells": int(groups[s][perturbed].sum()),
            "perturbed_groups": int(perturbed.sum()),
            "n_perturbations": len(labels),
            "cell_types": sorted({str(name(type_col, int(c))) for c in np.unique(cts)}),
            "perturbations": labels,
        }
    return {
        "config": config.path,
        "store": str(meta.path),
        "n_cells": int(meta.n_cells),
        "control_label": meta.control_label,
        "rules": config.to_dict(),
        "held_out": {
            "test_perturbations": held["test_pt"],
            "val_perturbations": held["val_pt"],
            "test_cell_types": held["test_ct"],
            "val_cell_types": held["val_ct"],
        },
        "splits": splits,
    }


def _preview(labels: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(x) for x in labels[:limit])
    more = f", ... ({len(labels) - limit} more)" if len(labels) > limit else ""
    return f"[{shown}{more}]"


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
