"""The epoch plan both set samplers share: groups cut into sets, the epoch's set order, each
set's cells, and the range reads behind them.

``SetSampler`` (perturbation pairs) and ``GroupSetSampler`` (group sets for pretraining) cut
groups of cells into sets by the same rules (set_sampler.py's module docstring), so they
share one implementation: the random streams below stay one definition, not two copies that
could drift apart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .blocks import CellBlock, StoreReader
from .cell_stream import ShardedIterable, check_stream_options, tail_lengths

# Tags that keep the random streams of different decisions independent; a sampler numbers
# its own further streams from 4.
GROUP_ORDER, SET_POOL, MEMBERS, FILL = 0, 1, 2, 3
MEMBER_ORDERS_KEPT = 256  # groups whose cell order is kept (a few MB at most)


@dataclass(frozen=True)
class SetsConfig:
    """The options every set sampler has. output: "dense" or "csr" X. columns /
    numeric_columns: as in ``CellStreamConfig``. buffer_sets: sets shuffled together (more =
    better mixing, more groups in the cache at once). cache_mb: range-cache budget per reader
    (per worker). max_read_cells: longest single ``read_rows``. on_corrupt: as in
    ``CellStreamConfig``; a set holding skipped cells is padded out whole."""

    set_size: int = 128
    seed: int = 0
    shuffle: bool = True
    output: str = "dense"
    columns: tuple[str, ...] | None = None
    numeric_columns: tuple[str, ...] = ()
    tail: str = "pad"
    buffer_sets: int = 64
    cache_mb: float = 512.0
    max_read_cells: int = 8192
    on_corrupt: str = "error"

    def __post_init__(self):
        if self.set_size < 1:
            raise ValueError(f"set_size must be >= 1, got {self.set_size}")
        check_stream_options(self)
        if self.buffer_sets < 1 or self.max_read_cells < 1 or self.cache_mb < 0:
            raise ValueError("buffer_sets and max_read_cells must be >= 1, cache_mb >= 0")


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


def read_pieces(
    index: pd.DataFrame, keys: tuple[str, ...], cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read pieces of a group index sorted by start: adjacent ranges with equal ``keys``
    columns are joined, then cut to at most ``cap`` rows. A set is a few such reads."""
    start = index["start"].to_numpy(np.int64)
    stop = index["stop"].to_numpy(np.int64)
    codes = np.stack([index[k].to_numpy(np.int64) for k in keys], axis=1)
    new = np.ones(len(start), dtype=bool)
    new[1:] = (start[1:] != stop[:-1]) | (codes[1:] != codes[:-1]).any(axis=1)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(start)) - 1
    p_start, p_stop = start[first], stop[last]
    n_chunks = -(-(p_stop - p_start) // cap)
    offsets = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    starts = np.repeat(p_start, n_chunks) + offsets * cap
    return starts, np.minimum(starts + cap, np.repeat(p_stop, n_chunks))


class SetEpochs(ShardedIterable):
    """Items that are sets cut from groups of cells, with the shared epoch plan.

    A subclass calls ``_cut_into_sets`` with its groups and then ``_shard_sets``, sets the
    read pieces ``_piece_starts`` / ``_piece_stops``, implements ``item(set_id, is_pad)`` and
    adds its own options to ``_layout()``.
    """

    config: SetsConfig

    def _cut_into_sets(self, group_cells: list[RowRanges]) -> np.ndarray:
        """Keep the groups and cut each into ``ceil(n / set_size)`` sets; the group sizes."""
        self.group_cells = group_cells
        sizes = np.array([g.n for g in group_cells], dtype=np.int64)
        self.group_sets = -(-sizes // self.config.set_size)
        self._first_set = np.concatenate([[0], np.cumsum(self.group_sets)]).astype(np.int64)
        self.n_sets = int(self._first_set[-1])
        self._set_group = np.repeat(np.arange(len(sizes)), self.group_sets)
        self._set_j = np.arange(self.n_sets) - self._first_set[self._set_group]
        return sizes

    def _shard_sets(self) -> None:
        self._slot_sets = self._split_over_slots(self.n_sets, "set")
        self._slot_counts = tail_lengths(self._slot_sets, 1, self.config.tail)
        self._cache: RangeCache | None = None

    def _layout(self) -> dict:
        """What must match for an exact resume; a subclass adds its own options."""
        cfg = self.config
        return {
            "n_cells": int(self.meta.n_cells),
            "n_sets": self.n_sets,
            "set_size": cfg.set_size,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "tail": cfg.tail,
            "buffer_sets": cfg.buffer_sets,
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
        groups = np.random.default_rng([seed, epoch, GROUP_ORDER]).permutation(len(self.group_sets))
        counts = self.group_sets[groups]
        within = np.arange(self.n_sets) - np.repeat(np.cumsum(counts) - counts, counts)
        seq = np.repeat(self._first_set[groups], counts) + within
        size = self.config.buffer_sets
        for p, a in enumerate(range(0, self.n_sets, size)):
            rng = np.random.default_rng([seed, epoch, SET_POOL, p])
            seq[a : a + size] = rng.permutation(seq[a : a + size])
        return seq

    def _member_order(self, g: int, epoch: int) -> np.ndarray:
        """Group ``g``'s cells in the epoch's order, kept for the next sets of the group: an
        epoch visits a group's sets close together (pools of ``buffer_sets``), and drawing
        the permutation anew for each set was a tenth of the sampler's time."""
        cache = self.__dict__.setdefault("_member_orders", OrderedDict())
        key = (g, epoch)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        n = self.group_cells[g].n
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch, MEMBERS, g]).permutation(n)
        else:
            order = np.arange(n)
        cache[key] = order
        while len(cache) > MEMBER_ORDERS_KEPT:
            cache.popitem(last=False)
        return order

    def set_members(self, set_id: int, epoch: int) -> tuple[int, np.ndarray, np.ndarray]:
        """A set's group, and its cells' rows and batch codes, topped up when short."""
        seed, size = self.config.seed, self.config.set_size
        g, j = int(self._set_group[set_id]), int(self._set_j[set_id])
        cells = self.group_cells[g]
        members = self._member_order(g, epoch)
        pos = members[j * size : (j + 1) * size]
        if len(pos) < size:
            fill = np.random.default_rng([seed, epoch, FILL, set_id])
            pos = np.concatenate([pos, fill.integers(0, cells.n, size - len(pos))])
        rows, batches = cells.locate(pos)
        return g, rows, batches

    # -- iteration --------------------------------------------------------------------------

    def _iter_slot(self, slot: int, start_item: int) -> Iterator[dict]:
        seq = self.epoch_sets()
        lo, n = int(self._slot_bounds[slot]), int(self._slot_sets[slot])
        for p in range(start_item, int(self._slot_counts[slot])):
            pad = p >= n
            yield self.item(int(seq[lo + (p - n) % n if pad else lo + p]), is_pad=pad)

    def item(self, set_id: int, is_pad: bool = False) -> dict:
        raise NotImplementedError

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
