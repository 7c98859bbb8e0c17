"""Pairs of (control set, perturbed set) for set-to-set perturbation models (STATE-style).

Rules
-----
- A perturbed set = ``set_size`` cells of one (cell type, perturbation) group, perturbation !=
  control. Within an epoch a group's cells are sampled without replacement: the group's cells
  are permuted by (seed, epoch, group) (row order with ``shuffle=False``) and cut into
  ``ceil(n_group / set_size)`` sets, so every cell of the group is in exactly one set. The
  last set, when short (and the only set of a group with fewer than ``set_size`` cells), is
  topped up with cells drawn with replacement from the group, as cell-load does.
- Its control set is matched cell by cell: for each perturbed cell, a control (perturbation ==
  ``control_label``) of the same cell type AND same batch; where that (cell type, batch) has
  no controls, a control of the same cell type from any batch; where the cell type has no
  controls at all, construction raises an error naming the cell type (unless
  ``allow_global_controls=True``, then any control). Controls are drawn uniformly, with
  replacement, by (seed, epoch, set).
- Output per pair: ``control`` and ``perturbed`` batch dicts (batches.py structure, dense or
  csr, position i of the control set matched to position i of the perturbed set), plus
  ``perturbation`` and ``cell_type`` codes, ``match_level`` (the coarsest fallback used in
  the set: "batch" | "cell_type" | "global"), ``match_levels`` (per cell: 0 batch,
  1 cell_type, 2 global), ``set_id`` (the set's index in the canonical set list) and
  ``is_pad``. Per-pair scalars are Python values, not tensors: each tensor costs a
  shared-memory transfer out of a DataLoader worker.
- Epoch size: each (cell type, perturbation) group contributes ``ceil(n_group / set_size)``
  sets. Cells whose perturbation code is missing (-1) are neither perturbed nor controls.
- Epoch order: groups permuted by (seed, epoch); their sets listed in that order, cut into
  pools of ``buffer_sets`` sets, each pool permuted by (seed, epoch, pool) (all of this skipped
  with ``shuffle=False``). Pools keep a group's sets close together, so the range cache below
  reads each group about once per epoch.
- Sharding, tails, determinism and resume are those of ``CellStream`` (cell_stream.py) with
  one pair as the item: slots = (rank, worker) take contiguous ranges of the epoch's set list;
  ``pad`` repeats a slot's own first sets (``is_pad=True``) so all ranks get equally many
  pairs.

Row subset: ``SetSampler(source, config, rows=...)`` (sorted or not, int row ids or a boolean
mask over the store) restricts BOTH the perturbed sets and the control pools to those rows,
e.g. ``rows=split.train`` from ``perturbation_splits.assign_split`` so no val/test cell is ever
seen in training. The subset is kept as runs of consecutive rows: every group range is
intersected with the runs (a group with no rows left disappears, the epoch size shrinks
accordingly), and the matching fallbacks above apply to the restricted control pools (a cell
type whose controls all lie outside the subset raises the error above, naming the subset).
Reads stay range-based: the read pieces are those of the whole store, trimmed to the subset's
first and last row inside them, so rows outside the subset may be read but are never emitted.
Without ``rows`` nothing changes.

IO: groups are contiguous row ranges (``reader.group_index()``), so a set is a few contiguous
``read_rows``. Adjacent ranges of one (cell type, perturbation) are read together (at most
``max_read_cells`` rows per read) and kept in an LRU cache of ``cache_mb`` MB: without one,
cell-load spent 70 s per batch re-reading.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .batches import make_batch
from .blocks import StoreReader
from .errors import DataValidationError
from .set_epochs import RowRanges, SetEpochs, SetsConfig, read_pieces

MATCH_LEVELS = ("batch", "cell_type", "global")

# The random stream of control matching; 0-3 are set_epochs' (group order, pools, members).
_CONTROLS = 4


@dataclass(frozen=True)
class SetSamplerConfig(SetsConfig):
    """What the set sampler yields; see the module docstring for the rules and
    ``SetsConfig`` for the options every set sampler has."""

    allow_global_controls: bool = False


@dataclass(frozen=True)
class _ControlTable:
    """Control pools of several batches laid end to end (``_control_table``): pool ``k``
    holds positions [offset[k], offset[k] + size[k]) of ``ranges``, at match level
    level[k]."""

    ranges: RowRanges
    offset: np.ndarray
    size: np.ndarray
    level: np.ndarray


@dataclass(frozen=True)
class RowSubset:
    """A set of store rows as sorted, disjoint runs [starts[k], stops[k]) of consecutive rows."""

    starts: np.ndarray  # int64
    stops: np.ndarray  # int64
    n_rows: int
    digest: str  # identifies the subset in ``state_dict`` layouts

    @classmethod
    def from_rows(cls, rows, n_cells: int) -> RowSubset:
        """From row ids (any order; repeats ignored) or a boolean mask of length ``n_cells``."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n_cells,):
                raise ValueError(f"a boolean rows mask needs shape ({n_cells},), got {rows.shape}")
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise TypeError(
                f"rows must be a 1-d array of integer row ids, got {rows.dtype} {rows.shape}"
            )
        rows = rows.astype(np.int64, copy=False)
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():  # np.unique hashes: slow
            rows = np.sort(rows)
            rows = rows[np.concatenate([[True], rows[1:] != rows[:-1]])]
        if len(rows) and (rows[0] < 0 or rows[-1] >= n_cells):
            raise ValueError(
                f"rows must lie in [0, {n_cells}) (the store's rows), got "
                f"[{int(rows[0])}, {int(rows[-1])}]"
            )
        new = np.ones(len(rows), dtype=bool)
        new[1:] = np.diff(rows) != 1
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(rows))[: len(first)] - 1
        digest = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        return cls(rows[first], rows[last] + 1, len(rows), digest)

    def restrict(self, index: pd.DataFrame) -> pd.DataFrame:
        """The group index intersected with the runs: one row per non-empty overlap."""
        start = index["start"].to_numpy(np.int64)
        stop = index["stop"].to_numpy(np.int64)
        first = np.searchsorted(self.stops, start, side="right")  # first run ending after start
        end = np.searchsorted(self.starts, stop, side="left")  # first run starting at/after stop
        counts = np.maximum(end - first, 0)
        which = np.repeat(np.arange(len(start)), counts)
        run = np.repeat(first, counts) + (
            np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        out = index.iloc[which].reset_index(drop=True)
        out["start"] = np.maximum(start[which], self.starts[run])
        out["stop"] = np.minimum(stop[which], self.stops[run])
        return out

    def trim(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ranges cut to their first and last subset row; ranges without one are dropped."""
        first = np.searchsorted(self.stops, starts, side="right")
        last = np.searchsorted(self.starts, stops, side="left") - 1
        keep = first <= last
        first, last = first[keep], last[keep]
        return (
            np.maximum(starts[keep], self.starts[first]),
            np.minimum(stops[keep], self.stops[last]),
        )


class SetSampler(SetEpochs):
    """Yields (control set, perturbed set) pairs; see the module docstring for the rules."""

    def __init__(
        self,
        source: StoreReader | Callable[[], StoreReader],
        config: SetSamplerConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        rows: np.ndarray | None = None,
    ):
        """rows: restrict perturbed sets and control pools to these store rows (row ids or a
        boolean mask; see "Row subset" in the module docstring); None = the whole store."""
        super().__init__(source, config or SetSamplerConfig(), rank, world_size, num_workers)
        full = self._reader.group_index().sort_values("start", kind="stable")
        self.row_subset = None if rows is None else RowSubset.from_rows(rows, self.meta.n_cells)
        index = full if self.row_subset is None else self.row_subset.restrict(full)
        self.control_code = self._control_code()
        self._build_groups(index)
        self._build_controls(index)
        self._build_pieces(full)
        self._check_controls(full)
        self._shard_sets()

    # -- construction -----------------------------------------------------------------------

    def _control_code(self) -> int:
        pert_col, label = self.meta.roles.get("perturbation"), self.meta.control_label
        if pert_col is None or label is None:
            raise DataValidationError(
                self.meta.path, "roles", "perturbation sets need a perturbation column and a "
                f"control label (roles={self.meta.roles}, control_label={label!r})",
                "build the store with --pert-col COLUMN and --control LABEL",
            )  # fmt: skip
        return self.meta.categories[pert_col].index(label)

    def _build_groups(self, index: pd.DataFrame) -> None:
        """Perturbed (cell type, perturbation) groups, each with its sets, in code order."""
        pert = index["perturbation"].to_numpy()
        perturbed = index[(pert != self.control_code) & (pert >= 0)]
        self.group_keys: list[tuple[int, int]] = []
        cells: list[RowRanges] = []
        for (ct, pt), frame in perturbed.groupby(["cell_type", "perturbation"], sort=True):
            self.group_keys.append((int(ct), int(pt)))
            cells.append(RowRanges.build(frame["start"], frame["stop"], frame["batch"]))
        self._cut_into_sets(cells)

    def _build_controls(self, index: pd.DataFrame) -> None:
        controls = index[index["perturbation"].to_numpy() == self.control_code]
        self._by_batch = {
            (int(ct), int(b)): RowRanges.build(f["start"], f["stop"], f["batch"])
            for (ct, b), f in controls.groupby(["cell_type", "batch"], sort=True)
        }
        self._by_type = {
            int(ct): RowRanges.build(f["start"], f["stop"], f["batch"])
            for ct, f in controls.groupby("cell_type", sort=True)
        }
        self._global = RowRanges.build(controls["start"], controls["stop"], controls["batch"])

    def _build_pieces(self, index: pd.DataFrame) -> None:
        """Read pieces: adjacent ranges of one (cell type, perturbation), capped in length."""
        self._piece_starts, self._piece_stops = read_pieces(
            index, ("cell_type", "perturbation"), self.config.max_read_cells
        )
        if self.row_subset is not None:  # read only from a piece's first to last subset row
            self._piece_starts, self._piece_stops = self.row_subset.trim(
                self._piece_starts, self._piece_stops
            )

    def _check_controls(self, full: pd.DataFrame) -> None:
        subset = self.row_subset
        where = (
            ""
            if subset is None
            else f" among the {subset.n_rows} of {self.meta.n_cells} rows the sampler is "
            "restricted to (rows=...)"
        )
        if self.config.allow_global_controls:
            if self.n_sets and self._global.n == 0:
                raise DataValidationError(
                    self.meta.path, "controls",
                    f"no control cells ({self.meta.control_label!r}) at all{where}",
                    "train on data with control cells",
                )  # fmt: skip
            return
        missing = sorted({ct for ct, _ in self.group_keys if ct not in self._by_type})
        if missing:
            names = [self._cell_type_name(ct) for ct in missing]
            problem = (
                f"cell type(s) {names} have perturbed cells but no control "
                f"cells ({self.meta.control_label!r}){where}"
            )
            outside = 0
            if subset is not None:
                ctrl = full[full["perturbation"] == self.control_code]
                sizes = (ctrl["stop"] - ctrl["start"])[ctrl["cell_type"].isin(missing)]
                outside = int(sizes.sum())
            if outside:
                fix = (
                    f"the store has {outside} controls of them, all outside the subset: a "
                    "split that holds out all controls of a cell type must hold out its "
                    "perturbed cells too (hold out the cell type), or keep some controls in "
                    "the subset; or set allow_global_controls=True"
                )
            else:
                fix = (
                    "add controls for them, drop them, or set allow_global_controls=True to "
                    "match them with controls of any cell type"
                )
            raise DataValidationError(self.meta.path, "controls", problem, fix)

    def _cell_type_name(self, code: int) -> str:
        col = self.meta.roles.get("cell_type")
        return (
            "<no cell type column>" if col is None or code < 0 else self.meta.categories[col][code]
        )

    def _layout(self) -> dict:
        layout = super()._layout() | {"allow_global_controls": self.config.allow_global_controls}
        if self.row_subset is not None:  # no key without: older state dicts still load
            layout["row_subset"] = f"{self.row_subset.n_rows}:{self.row_subset.digest}"
        return layout

    # -- the epoch plan (pure functions of seed and epoch; set_epochs has the shared part) ---

    def set_plan(self, set_id: int, epoch: int | None = None) -> dict:
        """Rows of a set's perturbed cells and of their matched controls (no data read)."""
        epoch = self.epoch if epoch is None else epoch
        g, rows, batches = self.set_members(set_id, epoch)
        controls, levels = self._match_controls(self.group_keys[g][0], batches, epoch, set_id)
        return {"rows": rows, "control_rows": controls, "levels": levels, "group": g}

    def _match_controls(
        self, cell_type: int, batches: np.ndarray, epoch: int, set_id: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.config.seed, epoch, _CONTROLS, set_id])
        present, which = np.unique(batches, return_inverse=True)
        table = self._control_table(cell_type, tuple(present.tolist()))
        pos = table.offset[which] + rng.integers(0, table.size[which])
        return table.ranges.locate(pos)[0], table.level[which]

    def _control_table(self, cell_type: int, batches: tuple[int, ...]) -> _ControlTable:
        """The control pools of ``batches`` in one table, so a set's controls are drawn and
        located in one step whatever its batches (a loop per batch was a fifth of the
        sampler's time). Kept per (cell type, batches): sets of a group repeat them."""
        tables = self.__dict__.setdefault("_control_tables", OrderedDict())
        key = (cell_type, batches)
        if key in tables:
            tables.move_to_end(key)
            return tables[key]
        pools = [self._control_pool(cell_type, b) for b in batches]
        sizes = np.array([pool.n for pool, _ in pools], dtype=np.int64)
        starts = np.concatenate([pool.starts for pool, _ in pools])
        ends = np.concatenate([pool.starts + np.diff(pool.cum) for pool, _ in pools])
        table = _ControlTable(
            ranges=RowRanges.build(starts, ends, np.zeros(len(starts), np.int32)),
            offset=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
            size=sizes,
            level=np.array([level for _, level in pools], dtype=np.int64),
        )
        tables[key] = table
        while len(tables) > 1024:
            tables.popitem(last=False)
        return table

    def _control_pool(self, cell_type: int, batch: int) -> tuple[RowRanges, int]:
        pool = self._by_batch.get((cell_type, batch))
        if pool is not None:
            return pool, 0
        pool = self._by_type.get(cell_type)
        if pool is not None:
            return pool, 1
        return self._global, 2  # only reachable with allow_global_controls (checked at init)

    # -- items ------------------------------------------------------------------------------

    def item(self, set_id: int, is_pad: bool = False) -> dict:
        """The pair dict for one set of the current epoch."""
        plan = self.set_plan(set_id)
        cache = self._range_cache()
        control, perturbed = cache.gather(plan["control_rows"]), cache.gather(plan["rows"])
        is_pad = is_pad or bool((control.rows < 0).any() or (perturbed.rows < 0).any())
        pad = np.full(self.config.set_size, is_pad)
        ct, pt = self.group_keys[plan["group"]]
        levels = plan["levels"]
        return {
            "control": make_batch(control, self.spec, pad),
            "perturbed": make_batch(perturbed, self.spec, pad),
            "perturbation": pt,
            "cell_type": ct,
            "match_level": MATCH_LEVELS[int(levels.max())],
            "match_levels": torch.from_numpy(levels),
            "set_id": set_id,
            "is_pad": bool(is_pad),
        }

    pair = item  # its name before the set samplers shared ``SetEpochs``
