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

IO: groups are contiguous row ranges (``reader.group_index()``), so a set is a few contiguous
``read_rows``. Adjacent ranges of one (cell type, perturbation) are read together (at most
``max_read_cells`` rows per read) and kept in an LRU cache of ``cache_mb`` MB: without one,
cell-load spent 70 s per batch re-reading.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .batches import OUTPUTS, make_batch
from .blocks import CellBlock, StoreReader
from .cell_stream import TAILS, ShardedIterable, tail_lengths

MATCH_LEVELS = ("batch", "cell_type", "global")

# Tags that keep the random streams of different decisions independent.
_GROUP_ORDER, _SET_POOL, _MEMBERS, _FILL, _CONTROLS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class SetSamplerConfig:
    """What the set sampler yields; see the module docstring for the rules.

    output: "dense" or "csr" X in both batch dicts. columns / numeric_columns: as in
    ``CellStreamConfig``. buffer_sets: sets shuffled together (more = better mixing, more
    groups in the cache at once). cache_mb: range-cache budget per reader (per worker).
    max_read_cells: longest single ``read_rows``.
    """

    set_size: int = 128
    seed: int = 0
    shuffle: bool = True
    output: str = "dense"
    columns: tuple[str, ...] | None = None
    numeric_columns: tuple[str, ...] = ()
    allow_global_controls: bool = False
    tail: str = "pad"
    buffer_sets: int = 64
    cache_mb: float = 512.0
    max_read_cells: int = 8192

    def __post_init__(self):
        if self.set_size < 1:
            raise ValueError(f"set_size must be >= 1, got {self.set_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.buffer_sets < 1 or self.max_read_cells < 1 or self.cache_mb < 0:
            raise ValueError("buffer_sets and max_read_cells must be >= 1, cache_mb >= 0")
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "numeric_columns", tuple(self.numeric_columns))


@dataclass(frozen=True)
class RowRanges:
    """A cell population as disjoint row ranges; maps positions 0..n-1 to rows (and batches)."""

    starts: np.ndarray  # int64, per range
    cum: np.ndarray  # int64, len(starts) + 1: position of each range's first cell
    batch: np.ndarray  # int32 batch code per range

    @classmethod
    def build(cls, starts, stops, batch) -> RowRanges:
        starts = np.asarray(starts, dtype=np.int64)
        sizes = np.asarray(stops, dtype=np.int64) - starts
        return cls(starts, np.concatenate([[0], np.cumsum(sizes)]), np.asarray(batch, np.int32))

    @property
    def n(self) -> int:
        return int(self.cum[-1])

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and batch codes of positions ``pos``."""
        k = np.searchsorted(self.cum, pos, side="right") - 1
        return self.starts[k] + (pos - self.cum[k]), self.batch[k]


class RangeCache:
    """Reads row pieces through ``read_rows`` and keeps recent ones under a memory budget."""

    def __init__(self, reader: StoreReader, starts: np.ndarray, stops: np.ndarray, budget: int):
        self.reader, self.starts, self.stops, self.budget = reader, starts, stops, budget
        self._blocks: OrderedDict[int, CellBlock] = OrderedDict()
        self._bytes = 0
        self.reads = 0

    def gather(self, rows: np.ndarray) -> CellBlock:
        """The cells at ``rows`` (any order, repeats allowed), in that order."""
        piece = np.searchsorted(self.starts, rows, side="right") - 1
        if (piece == piece[0]).all():
            return self._get(int(piece[0])).take(rows - self.starts[piece[0]])
        order = np.argsort(piece, kind="stable")
        sorted_piece = piece[order]
        cuts = np.flatnonzero(np.diff(sorted_piece)) + 1
        parts = []
        for seg in np.split(order, cuts):
            p = int(piece[seg[0]])
            parts.append(self._get(p).take(rows[seg] - self.starts[p]))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return CellBlock.concat(parts).take(inverse)

    def _get(self, p: int) -> CellBlock:
        if p in self._blocks:
            self._blocks.move_to_end(p)
            return self._blocks[p]
        block = replace(self.reader.read_rows(int(self.starts[p]), int(self.stops[p])), names=None)
        self.reads += 1
        self._blocks[p] = block
        self._bytes += _nbytes(block)
        while self._bytes > self.budget and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= _nbytes(old)
        return block


class SetSampler(ShardedIterable):
    """Yields (control set, perturbed set) pairs; see the module docstring for the rules."""

    def __init__(
        self,
        source: StoreReader | Callable[[], StoreReader],
        config: SetSamplerConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__(source, config or SetSamplerConfig(), rank, world_size, num_workers)
        index = self._reader.group_index().sort_values("start", kind="stable")
        self.control_code = self._control_code()
        self._build_groups(index)
        self._build_controls(index)
        self._build_pieces(index)
        self._check_controls()
        self._slot_sets = self._split_over_slots(self.n_sets, "set")
        self._slot_counts = tail_lengths(self._slot_sets, 1, self.config.tail)
        self._cache: RangeCache | None = None

    # -- construction -----------------------------------------------------------------------

    def _control_code(self) -> int:
        pert_col, label = self.meta.roles.get("perturbation"), self.meta.control_label
        if pert_col is None or label is None:
            raise ValueError(
                f"{self.meta.path}: the set sampler needs a perturbation role column and a "
                f"control label (roles={self.meta.roles}, control_label={label!r})"
            )
        return self.meta.categories[pert_col].index(label)

    def _build_groups(self, index: pd.DataFrame) -> None:
        """Perturbed (cell type, perturbation) groups, each with its sets, in code order."""
        pert = index["perturbation"].to_numpy()
        perturbed = index[(pert != self.control_code) & (pert >= 0)]
        self.group_keys: list[tuple[int, int]] = []
        self.group_cells: list[RowRanges] = []
        for (ct, pt), frame in perturbed.groupby(["cell_type", "perturbation"], sort=True):
            self.group_keys.append((int(ct), int(pt)))
            self.group_cells.append(RowRanges.build(frame["start"], frame["stop"], frame["batch"]))
        sizes = np.array([g.n for g in self.group_cells], dtype=np.int64)
        self.group_sets = -(-sizes // self.config.set_size)
        self._first_set = np.concatenate([[0], np.cumsum(self.group_sets)]).astype(np.int64)
        self.n_sets = int(self._first_set[-1])
        self._set_group = np.repeat(np.arange(len(sizes)), self.group_sets)
        self._set_j = np.arange(self.n_sets) - self._first_set[self._set_group]

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
        start = index["start"].to_numpy(np.int64)
        stop = index["stop"].to_numpy(np.int64)
        ct = index["cell_type"].to_numpy()
        pt = index["perturbation"].to_numpy()
        new = np.ones(len(start), dtype=bool)
        new[1:] = (start[1:] != stop[:-1]) | (ct[1:] != ct[:-1]) | (pt[1:] != pt[:-1])
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(start)) - 1
        p_start, p_stop = start[first], stop[last]
        cap = self.config.max_read_cells
        n_chunks = -(-(p_stop - p_start) // cap)
        base = np.repeat(p_start, n_chunks)
        offsets = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        self._piece_starts = base + offsets * cap
        self._piece_stops = np.minimum(self._piece_starts + cap, np.repeat(p_stop, n_chunks))

    def _check_controls(self) -> None:
        if self.config.allow_global_controls:
            if self.n_sets and self._global.n == 0:
                raise ValueError(
                    f"{self.meta.path}: no control cells ({self.meta.control_label!r}) at all"
                )
            return
        missing = sorted({ct for ct, _ in self.group_keys if ct not in self._by_type})
        if missing:
            names = [self._cell_type_name(ct) for ct in missing]
            raise ValueError(
                f"{self.meta.path}: cell type(s) {names} have perturbed cells but no control "
                f"cells ({self.meta.control_label!r}); add controls for them, drop them, or set "
                "allow_global_controls=True to match them with controls of any cell type"
            )

    def _cell_type_name(self, code: int) -> str:
        col = self.meta.roles.get("cell_type")
        return (
            "<no cell type column>" if col is None or code < 0 else self.meta.categories[col][code]
        )

    def _layout(self) -> dict:
        cfg = self.config
        return {
            "n_cells": int(self.meta.n_cells),
            "n_sets": self.n_sets,
            "set_size": cfg.set_size,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "tail": cfg.tail,
            "buffer_sets": cfg.buffer_sets,
            "allow_global_controls": cfg.allow_global_controls,
            "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank,
        }

    # -- the epoch plan (pure functions of seed and epoch) ----------------------------------

    def epoch_sets(self, epoch: int | None = None) -> np.ndarray:
        """Set ids (indices into the canonical list) in the epoch's order."""
        epoch = self.epoch if epoch is None else epoch
        if not self.config.shuffle:
            return np.arange(self.n_sets)
        seed = self.config.seed
        groups = np.random.default_rng([seed, epoch, _GROUP_ORDER]).permutation(
            len(self.group_sets)
        )
        counts = self.group_sets[groups]
        within = np.arange(self.n_sets) - np.repeat(np.cumsum(counts) - counts, counts)
        seq = np.repeat(self._first_set[groups], counts) + within
        size = self.config.buffer_sets
        for p, a in enumerate(range(0, self.n_sets, size)):
            rng = np.random.default_rng([seed, epoch, _SET_POOL, p])
            seq[a : a + size] = rng.permutation(seq[a : a + size])
        return seq

    def set_plan(self, set_id: int, epoch: int | None = None) -> dict:
        """Rows of a set's perturbed cells and of their matched controls (no data read)."""
        epoch = self.epoch if epoch is None else epoch
        seed, size = self.config.seed, self.config.set_size
        g, j = int(self._set_group[set_id]), int(self._set_j[set_id])
        cells = self.group_cells[g]
        if self.config.shuffle:
            members = np.random.default_rng([seed, epoch, _MEMBERS, g]).permutation(cells.n)
        else:
            members = np.arange(cells.n)
        pos = members[j * size : (j + 1) * size]
        if len(pos) < size:
            fill = np.random.default_rng([seed, epoch, _FILL, set_id])
            pos = np.concatenate([pos, fill.integers(0, cells.n, size - len(pos))])
        rows, batches = cells.locate(pos)
        controls, levels = self._match_controls(self.group_keys[g][0], batches, epoch, set_id)
        return {"rows": rows, "control_rows": controls, "levels": levels, "group": g}

    def _match_controls(
        self, cell_type: int, batches: np.ndarray, epoch: int, set_id: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.config.seed, epoch, _CONTROLS, set_id])
        rows = np.empty(len(batches), dtype=np.int64)
        levels = np.empty(len(batches), dtype=np.int64)
        for b in np.unique(batches):
            mask = batches == b
            pool, level = self._control_pool(cell_type, int(b))
            rows[mask] = pool.locate(rng.integers(0, pool.n, int(mask.sum())))[0]
            levels[mask] = level
        return rows, levels

    def _control_pool(self, cell_type: int, batch: int) -> tuple[RowRanges, int]:
        pool = self._by_batch.get((cell_type, batch))
        if pool is not None:
            return pool, 0
        pool = self._by_type.get(cell_type)
        if pool is not None:
            return pool, 1
        return self._global, 2  # only reachable with allow_global_controls (checked at init)

    # -- iteration --------------------------------------------------------------------------

    def _iter_slot(self, slot: int, start_item: int) -> Iterator[dict]:
        seq = self.epoch_sets()
        lo, n = int(self._slot_bounds[slot]), int(self._slot_sets[slot])
        for p in range(start_item, int(self._slot_counts[slot])):
            pad = p >= n
            yield self.pair(int(seq[lo + (p - n) % n if pad else lo + p]), is_pad=pad)

    def pair(self, set_id: int, is_pad: bool = False) -> dict:
        """The pair dict for one set of the current epoch."""
        plan = self.set_plan(set_id)
        cache = self._range_cache()
        pad = np.full(self.config.set_size, is_pad)
        ct, pt = self.group_keys[plan["group"]]
        levels = plan["levels"]
        return {
            "control": make_batch(cache.gather(plan["control_rows"]), self.spec, pad),
            "perturbed": make_batch(cache.gather(plan["rows"]), self.spec, pad),
            "perturbation": pt,
            "cell_type": ct,
            "match_level": MATCH_LEVELS[int(levels.max())],
            "match_levels": torch.from_numpy(levels),
            "set_id": set_id,
            "is_pad": bool(is_pad),
        }

    def _range_cache(self) -> RangeCache:
        if self._cache is None:
            budget = int(self.config.cache_mb * 2**20)
            self._cache = RangeCache(
                self._get_reader(), self._piece_starts, self._piece_stops, budget
            )
        return self._cache

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None  # workers build their own cache
        return state


def _nbytes(block: CellBlock) -> int:
    X = block.X
    arrays = [X.data, X.indices, X.indptr, block.rows, block.library_size]
    arrays += list(block.codes.values()) + list(block.numeric.values())
    return int(sum(a.nbytes for a in arrays))
