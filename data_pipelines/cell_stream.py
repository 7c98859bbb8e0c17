"""Shuffled, sharded batches of cells from any ``StoreReader``, with exact mid-epoch resume.

Chunked stores are only fast when read a whole unit (Zarr chunk, WebDataset shard) at a time,
so shuffling happens at two levels: the order of units, then rows inside a buffer of a few
units. Which cell lands in which batch is a pure function of (seed, epoch, world_size,
num_workers) and the store's unit sizes; that is what makes the every-cell-once,
equal-batch-count and exact-resume guarantees below hold and testable.

Semantics
---------
Epoch order
    The units are permuted by (seed, epoch) (kept in row order when ``shuffle=False``).
    Concatenated in that order they form one virtual sequence of all ``n_cells`` cells.
Slots
    ``world_size * K`` slots, ``K = max(1, num_workers)``; slot ``s = rank * K + worker``.
    Slot ``s`` takes virtual positions ``[s*n // S, (s+1)*n // S)``: every cell goes to exactly
    one slot and slot sizes differ by at most one. A unit cut by a slot boundary is read by
    both slots, each keeping its part. The cells of a rank (the union of its slots) are the
    virtual positions ``[rank*n // W, (rank+1)*n // W)`` whatever ``num_workers`` is.
Pools
    Within a slot, cells are grouped in sequence order into pools of ``pool_cells`` cells
    (``buffer_cells``, or ``buffer_units`` times the mean unit size). Each pool's rows are
    permuted by (seed, epoch, slot, pool) (not when ``shuffle=False``). The slot's stream is
    the concatenation of the permuted pools, cut into batches of ``batch_size`` (a batch may
    straddle two pools). Resuming at stream position c loads only the pool holding c.
Tails
    ``partial`` (evaluation): the exact split; a slot's last batch may be short and slots may
    differ by one batch. ``pad`` (training default): every slot is extended to the same number
    of cells, a multiple of ``batch_size``, by repeating its own stream from the start; the
    repeats carry ``is_pad=True`` so losses and metrics can drop them, and every rank gets the
    same number of full batches (no DDP hang). Needs at least one cell per slot.
    ``drop``: every slot is cut to the same multiple of ``batch_size``; the cut cells are not
    seen that epoch (a different set each epoch when shuffling).
Topology
    ``rank``/``world_size`` are explicit or taken from ``torch.distributed`` (if initialized),
    else the ``RANK``/``WORLD_SIZE`` environment variables, else 0/1. ``num_workers`` must
    equal the DataLoader's (checked in each worker): the stream yields whole batches, so use
    ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)`` or
    ``stream.loader()``. Do not use ``persistent_workers`` (workers would keep a stale
    epoch) and do not pass the loader through ``accelerator.prepare`` (it would shard again);
    move batches with ``accelerate.utils.send_to_device``.
Determinism
    Same (seed, epoch, world_size, num_workers) gives identical batches. Per-rank cell sets
    (before tails) do not depend on ``num_workers``.
Resume
    The DataLoader hands out batches round-robin over workers (batch j from worker j % K while
    all have data, skipping workers that ran out). Batch counts per slot are known in advance,
    so ``resume(epoch, batches_consumed)`` computes each slot's offset and which slot comes
    next; the new loader's worker i then serves slot ``(i + next) % K`` from its offset, and
    the concatenation of the batches before and after equals one uninterrupted epoch. A
    resume holds for that epoch until ``set_epoch`` moves to another epoch. A checkpoint's
    layout must match the stream's; over a row subset (``row_subset``: a split's train rows)
    the layout includes the rows' digest.

``SetSampler`` (set_sampler.py) reuses the slot, tail and resume machinery in
``ShardedIterable``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .allocator import keep_freed_memory
from .batches import OUTPUTS, BatchSpec, make_batch
from .blocks import CellBlock, StoreReader
from .errors import UserInputError
from .integrity import ON_CORRUPT
from .remote import is_url
from .skipping_reader import SKIPPED_KEY, SkippingReader
from .worker_transfer import pack, unpack

TAILS = ("pad", "drop", "partial")
# Units read ahead per slot for a store behind a URL (``CellStreamConfig.fetch_units``): in
# the remote-latency benchmark 8 hide 20 ms per request for Zarr and 100 ms for WebDataset.
REMOTE_FETCH_UNITS = 8
ERROR_KEY = "_error"  # an item carrying a worker's UserInputError to the main process

# Tags that keep the random streams of different decisions independent.
_UNIT_ORDER, _POOL_ORDER = 0, 1


# -- sharding helpers (shared with set_sampler) ---------------------------------------------


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed, else RANK/WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            env_rank, env_world = dist.get_rank(), dist.get_world_size()
        else:
            env_rank = int(os.environ.get("RANK", 0))
            env_world = int(os.environ.get("WORLD_SIZE", 1))
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def current_worker(num_workers: int, owner: str) -> int:
    """This process's DataLoader worker id, checking the loader matches the planned layout."""
    info = get_worker_info()
    actual = 0 if info is None else info.num_workers
    if max(actual, 1) != max(num_workers, 1):
        raise RuntimeError(
            f"{owner} was built for num_workers={num_workers} but is iterated with "
            f"{actual} DataLoader workers; pass the same num_workers to both (or use .loader())"
        )
    return 0 if info is None else info.id


def even_bounds(n: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries splitting ``n`` items into contiguous parts differing by <= 1."""
    return (np.arange(parts + 1, dtype=np.int64) * n) // parts


def tail_lengths(sizes: np.ndarray, batch_size: int, tail: str) -> np.ndarray:
    """Items each slot emits after applying the tail rule to its ``sizes`` real items."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if tail == "partial":
        return sizes.copy()
    if tail == "pad":
        longest = int(sizes.max()) if len(sizes) else 0
        return np.full(len(sizes), -(-longest // batch_size) * batch_size, dtype=np.int64)
    if tail == "drop":
        shortest = int(sizes.min()) if len(sizes) else 0
        return np.full(len(sizes), (shortest // batch_size) * batch_size, dtype=np.int64)
    raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def round_robin_resume(counts: np.ndarray, consumed: int) -> tuple[np.ndarray, int]:
    """Per-worker offsets after ``consumed`` round-robin batches, and the worker due next.

    Order: round t yields batch t of every worker that has more than t batches, in worker
    order (what the DataLoader does, skipping exhausted workers).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= consumed <= total:
        raise ValueError(f"batches_consumed={consumed} outside [0, {total}] for this epoch")
    if consumed == total:
        return counts.copy(), 0
    lo, hi = 0, int(counts.max())  # largest full-round count t with f(t) <= consumed
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= consumed:
            lo = mid
        else:
            hi = mid - 1
    offsets = np.minimum(counts, lo)
    remainder = consumed - int(offsets.sum())
    active = np.flatnonzero(counts > lo)
    offsets[active[:remainder]] += 1
    return offsets, int(active[remainder])


def check_stream_options(config) -> None:
    """Check and normalize the options every stream config has (seed, tail, output,
    columns), so the cell stream and the set samplers accept exactly the same values."""
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}")
    if config.tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {config.tail!r}")
    if config.output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {config.output!r}")
    if config.on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {config.on_corrupt!r}")
    if config.columns is not None:
        object.__setattr__(config, "columns", tuple(config.columns))
    object.__setattr__(config, "numeric_columns", tuple(config.numeric_columns))


def open_source(source) -> tuple[Callable[[], StoreReader] | None, StoreReader]:
    """A reader and, if ``source`` was a factory, the factory (so workers reopen their own)."""
    if hasattr(source, "meta") and hasattr(source, "read_unit"):
        return None, source
    if callable(source):
        return source, source()
    raise TypeError("source must be a StoreReader or a callable returning one")


class ShardedIterable(IterableDataset):
    """Rank/worker slots, epochs, tails and exact resume for datasets that yield whole items.

    Subclasses set ``_slot_counts`` (items each slot yields, all slots) and implement
    ``_iter_slot(slot, start_item)`` and ``_layout()``.
    A source is a picklable StoreReader or a factory returning one; with a factory, each
    DataLoader worker opens its own reader on first use (file handles are not shared across
    processes), while a reader given directly is pickled into the workers.
    """

    _slot_counts: np.ndarray
    # set by StreamLoader while it starts its workers: items cross as one block (unpacked there)
    pack_in_workers: bool = False

    def __init__(self, source, config, rank: int | None, world_size: int | None, num_workers: int):
        """Common set-up: ``config`` carries ``output``, ``columns`` and ``numeric_columns``."""
        self.config = config
        self._factory, self._reader = open_source(source)
        self.meta = self._reader.meta
        self.spec = BatchSpec.from_meta(
            self.meta, config.output, config.columns, config.numeric_columns
        )
        self._init_topology(rank, world_size, num_workers)

    def _get_reader(self) -> StoreReader:
        """This process's reader; with ``on_corrupt="skip"``, damaged units read as
        placeholder cells (``skipping_reader``), padded out of every batch."""
        if self._reader is None:
            self._reader = self._factory()
        if self.config.on_corrupt == "skip" and not isinstance(self._reader, SkippingReader):
            self._reader = SkippingReader(self._reader)
        return self._reader

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._factory is not None:
            state["_reader"] = None  # each worker opens its own handle
        return state

    def _split_over_slots(self, n_items: int, item: str) -> np.ndarray:
        """Contiguous, even split of the epoch's ``n_items`` over all slots (bounds kept in
        ``_slot_bounds``); the real items per slot. ``pad`` tails need one item per slot."""
        self._slot_bounds = even_bounds(n_items, self.n_slots)
        sizes = np.diff(self._slot_bounds)
        if self.config.tail == "pad" and n_items and sizes.min() == 0:
            raise ValueError(
                f"tail='pad' needs at least one {item} per slot, but {n_items} {item}s are "
                f"split over {self.n_slots} slots (world_size x num_workers); use fewer "
                "workers or tail='partial'"
            )
        return sizes

    def _init_topology(self, rank: int | None, world_size: int | None, num_workers: int) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.num_workers = int(num_workers)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def n_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def rank_counts(self) -> np.ndarray:
        """Items each of this rank's workers yields in a full epoch."""
        k = self.workers_per_rank
        return self._slot_counts[self.rank * k : (self.rank + 1) * k]

    def __len__(self) -> int:
        """Items this rank yields in a full epoch (the same on every rank unless tail=partial)."""
        return int(self.rank_counts().sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; a pending resume survives only for its own epoch."""
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_consumed: int) -> None:
        """Make iteration of ``epoch`` start right after its first ``batches_consumed`` items."""
        round_robin_resume(self.rank_counts(), batches_consumed)  # validates the count
        self.epoch = int(epoch)
        self._resume = (self.epoch, int(batches_consumed)) if batches_consumed else None

    def resume_offset(self) -> int:
        """Items of the current epoch skipped by a pending resume (0 if none)."""
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume[1]
        return 0

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """Checkpoint state; pass the items consumed so far this epoch (default: resume point)."""
        consumed = self.resume_offset() if batches_consumed is None else int(batches_consumed)
        return {"epoch": self.epoch, "batches_consumed": consumed, "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; the layout must match or the order would differ."""
        layout = self._layout()
        if dict(state["layout"]) != layout:
            diff = {
                k: (state["layout"].get(k), v)
                for k, v in layout.items()
                if state["layout"].get(k) != v
            }
            raise ValueError(
                f"cannot resume exactly: layout differs (saved, now): {diff}; resume with the "
                "same store, seed, batch size, tail, world size and num_workers"
            )
        self.resume(state["epoch"], state["batches_consumed"])

    def loader(self, **dataloader_kwargs) -> StreamLoader:
        """A counting DataLoader wrapper with matching ``num_workers`` (see ``StreamLoader``)."""
        return StreamLoader(self, **dataloader_kwargs)

    def __iter__(self) -> Iterator[dict]:
        # Reads the state eagerly (not in a generator body), so the state at iter() counts.
        worker = current_worker(self.num_workers, type(self).__name__)
        k = self.workers_per_rank
        counts = self.rank_counts()
        offsets, first = round_robin_resume(counts, self.resume_offset())
        local = (worker + first) % k
        return self._reported(self._iter_slot(self.rank * k + local, int(offsets[local])))

    def _reported(self, items: Iterator[dict]) -> Iterator[dict]:
        """Items with the damaged units found while making them (``SKIPPED_KEY``); in a
        DataLoader worker, a user-facing error becomes an item (``ERROR_KEY``) so that the
        main process raises it as itself (the DataLoader would turn it into a RuntimeError
        holding a traceback)."""
        in_worker = get_worker_info() is not None
        packing = in_worker and self.pack_in_workers
        try:
            for item in items:
                if isinstance(self._reader, SkippingReader):
                    new = self._reader.drain()
                    if new:
                        item[SKIPPED_KEY] = new
                yield pack(item) if packing else item
        except UserInputError as err:
            if not in_worker:
                raise
            yield {ERROR_KEY: err}

    def _iter_slot(self, slot: int, start_item: int) -> Iterator[dict]:
        raise NotImplementedError

    def _layout(self) -> dict:
        raise NotImplementedError


def already_collated(item):
    """Items are finished batches of tensors; the DataLoader's default conversion would only
    walk each dict again (about 0.2 ms a batch)."""
    return item


class StreamLoader:
    """A DataLoader over a ``ShardedIterable`` that counts the items it delivered this epoch.

    ``state_dict()`` records that count, so a checkpoint resumes exactly after the last item
    the training loop received. Builds a fresh DataLoader per epoch (non-persistent workers,
    so each epoch's workers see the current epoch and resume point).
    """

    def __init__(self, dataset: ShardedIterable, **dataloader_kwargs):
        for key in ("batch_size", "num_workers", "shuffle", "sampler", "batch_sampler"):
            if key in dataloader_kwargs:
                raise ValueError(f"{key} is set by the stream; do not pass it to the loader")
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep a stale epoch in the workers")
        self.dataset = dataset
        self.dataloader_kwargs = dataloader_kwargs
        self.batches_consumed = dataset.resume_offset()
        self._skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        self.batches_consumed = self.dataset.resume_offset()
        for item in self._items():
            item = unpack(item)
            if ERROR_KEY in item:
                raise item[ERROR_KEY]
            skipped = item.pop(SKIPPED_KEY, None)
            if skipped:
                self._note_skipped(skipped)
            self.batches_consumed += 1
            yield item

    def _note_skipped(self, skipped: dict[str, str]) -> None:
        for file, problem in skipped.items():
            if file not in self._skipped:
                self._skipped[file] = problem
                print(
                    f"warning: skipping damaged data {file} ({problem}); its cells are left "
                    'out of training (data.on_corrupt = "skip")',
                    file=sys.stderr,
                    flush=True,
                )

    def corrupt_units(self) -> list[dict]:
        """Damaged files this loader skipped so far (``on_corrupt="skip"``), in order found."""
        return [{"file": f, "problem": p} for f, p in self._skipped.items()]

    def _items(self) -> Iterator[dict]:
        """In-process streams skip the DataLoader: it would only add per-batch overhead
        (about 0.15 ms a batch, 15% of a fast Zarr stream) to items that are finished batches."""
        if self.dataset.num_workers == 0 and not self.dataloader_kwargs:
            return iter(self.dataset)
        kwargs = {"collate_fn": already_collated, **self.dataloader_kwargs}
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.dataset.num_workers, **kwargs
        )
        self.dataset.pack_in_workers = self.dataset.num_workers > 0  # read as workers start
        try:
            return iter(loader)
        finally:
            self.dataset.pack_in_workers = False

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.batches_consumed = self.dataset.resume_offset()

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self.batches_consumed)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.batches_consumed = self.dataset.resume_offset()


# -- CellStream -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStreamConfig:
    """What a cell stream yields; see the module docstring for the exact semantics.

    buffer_cells, when set, overrides buffer_units as the pool size in cells.
    columns: categorical obs columns in ``obs`` (None: all but ``_``-prefixed ones; the role
    columns are always added under their role names). numeric_columns: numeric obs columns.
    on_corrupt: "error" stops at a damaged unit (``CorruptDataError`` naming the file);
    "skip" pads its cells out and reports it (``skipping_reader``).
    fetch_units: units each slot reads ahead concurrently (threads; ``_UnitFetcher``). None:
    1 for a local store (disk reads are fast; the pool builders suffice) and
    ``REMOTE_FETCH_UNITS`` for a store behind a URL, where each read waits 10-100 ms on the
    network (``latentcell benchmark remote-latency`` measures how many hide that).
    build_threads: pools decoded and shuffled at once, each on its own thread (decompression,
    file reads and row gathers release the GIL). None: 2 for a local store read in-process
    (``num_workers=0``), where it keeps a second core busy; 1 otherwise (DataLoader workers
    are the parallelism; a remote store's parallelism is ``fetch_units``).
    """

    batch_size: int = 256
    shuffle: bool = True
    seed: int = 0
    buffer_units: int = 8
    buffer_cells: int | None = None
    tail: str = "pad"
    output: str = "csr"
    columns: tuple[str, ...] | None = None
    numeric_columns: tuple[str, ...] = ()
    on_corrupt: str = "error"
    fetch_units: int | None = None
    build_threads: int | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.fetch_units is not None and self.fetch_units < 1:
            raise ValueError(f"fetch_units must be >= 1, got {self.fetch_units}")
        if self.build_threads is not None and self.build_threads < 1:
            raise ValueError(f"build_threads must be >= 1, got {self.build_threads}")
        if self.buffer_units < 1 or (self.buffer_cells is not None and self.buffer_cells < 1):
            raise ValueError("buffer_units and buffer_cells must be >= 1")
        check_stream_options(self)


class CellStream(ShardedIterable):
    """Batches of cells from ``source`` (a picklable StoreReader or a factory returning one)."""

    def __init__(
        self,
        source: StoreReader | Callable[[], StoreReader],
        config: CellStreamConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__(source, config or CellStreamConfig(), rank, world_size, num_workers)
        # A row subset (``row_subset.RowSubset``, a split's rows) names its rows by digest.
        self._rows_digest = getattr(self._reader, "rows_digest", None)
        self._unit_sizes = np.asarray(self.meta.unit_sizes, dtype=np.int64)
        self._unit_starts = np.concatenate([[0], np.cumsum(self._unit_sizes)])  # store rows
        self.pool_cells = self._pool_cells()
        self._slot_cells = self._split_over_slots(self.meta.n_cells, "cell")
        self._slot_out = tail_lengths(self._slot_cells, self.config.batch_size, self.config.tail)
        self._slot_counts = -(-self._slot_out // self.config.batch_size)
        remote = is_url(str(self.meta.path))
        self.fetch_units = self.config.fetch_units or (REMOTE_FETCH_UNITS if remote else 1)
        local_in_process = not remote and self.num_workers == 0 and self.fetch_units == 1
        self.build_threads = self.config.build_threads or (2 if local_in_process else 1)

    def unit_order(self, epoch: int | None = None) -> np.ndarray:
        """Units in the order they form the epoch's virtual sequence."""
        n_units = len(self._unit_sizes)
        if not self.config.shuffle:
            return np.arange(n_units)
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.config.seed, epoch, _UNIT_ORDER]).permutation(n_units)

    def slot_cells(self) -> np.ndarray:
        """Real (unpadded) cells per slot, all slots."""
        return self._slot_cells.copy()

    def _pool_cells(self) -> int:
        if self.config.buffer_cells is not None:
            return int(self.config.buffer_cells)
        n_units = max(len(self._unit_sizes), 1)
        mean_unit = max(1, round(self.meta.n_cells / n_units))
        return int(self.config.buffer_units * mean_unit)

    def _layout(self) -> dict:
        cfg = self.config
        return {
            "n_cells": int(self.meta.n_cells),
            "n_units": len(self._unit_sizes),
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "batch_size": cfg.batch_size,
            "tail": cfg.tail,
            "pool_cells": self.pool_cells,
            "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank,
            # only for row subsets, so the layouts of existing checkpoints are unchanged: two
            # splits with equal sizes must not resume into each other
            **({"rows_digest": self._rows_digest} if self._rows_digest else {}),
        }

    def _iter_slot(self, slot: int, start_batch: int) -> Iterator[dict]:
        keep_freed_memory()  # pools are allocated and freed every few ms (``allocator``)
        order = self.unit_order()
        cells = _SlotCells(
            reader=self._get_reader(),
            unit_order=order,
            unit_vstart=np.concatenate([[0], np.cumsum(self._unit_sizes[order])]),
            unit_starts=self._unit_starts,
            start=int(self._slot_bounds[slot]),
            n=int(self._slot_cells[slot]),
            pool_cells=self.pool_cells,
            pool_seed=(self.config.seed, self.epoch, _POOL_ORDER, slot)
            if self.config.shuffle
            else None,
            head_cells=int(self._slot_out[slot] - self._slot_cells[slot]),
            fetch_units=self.fetch_units,
            build_threads=self.build_threads,
        )
        return self._batches(cells, start_batch, int(self._slot_out[slot]))

    def _batches(self, cells: _SlotCells, start_batch: int, n_out: int) -> Iterator[dict]:
        size = self.config.batch_size
        for a in range(start_batch * size, n_out, size):
            b = min(a + size, n_out)
            block = cells.positions(a, b)
            pad = (np.arange(a, b) >= cells.n) | (block.rows < 0)  # rows < 0: skipped units
            yield make_batch(block, self.spec, is_pad=pad)


@dataclass
class _Pool:
    """A pool's cells already in stream order (permuted when building it)."""

    cells: CellBlock


class _SlotCells:
    """One slot's stream of cells: reads units, builds shuffled pools, serves position ranges.

    A pool is permuted once when it is built, on a builder thread that also decodes it, so a
    batch is a contiguous row slice of the pool on the consumer's thread. ``build_threads``
    pools are built ahead at once: decompression, file reads and the row gather release the
    GIL, so a second core does real work without the inter-process copies of DataLoader
    workers (one builder left the stream bound by one core: 430k cells/s with the CPU busy
    0.48 s per 0.47 s of wall time, `latentcell benchmark loader`).
    Keeps the last pools read (a batch may straddle two), units shared by two pools (a unit
    cut by a pool boundary is read once, ``_SharedUnits``) and the first ``head_cells`` of
    the stream (the pad tail repeats them; keeping them avoids re-reading the first pool at
    the end of the epoch).
    """

    def __init__(
        self,
        reader: StoreReader,
        unit_order: np.ndarray,
        unit_vstart: np.ndarray,
        start: int,
        n: int,
        pool_cells: int,
        pool_seed: tuple | None,
        head_cells: int,
        fetch_units: int = 1,
        build_threads: int = 1,
        unit_starts: np.ndarray | None = None,
    ):
        self.reader = reader
        self.unit_starts = unit_starts  # first store row of each unit (for ``read_ranges``)
        fetcher = _UnitFetcher(reader, unit_order, fetch_units) if fetch_units > 1 else None
        self._fetching = fetcher is not None
        # the fetcher serves units in sequence order to one caller: one builder with it
        self.build_threads = 1 if fetcher else build_threads
        self._units = _SharedUnits(
            fetcher.get if fetcher else (lambda k: reader.read_unit(int(unit_order[k]))),
            keep=2 * self.build_threads,
        )
        self.order = unit_order
        self.vstart = unit_vstart
        self.start, self.n, self.pool_cells = start, n, pool_cells
        self.n_pools = -(-n // pool_cells) if n else 0
        self.pool_seed = pool_seed
        self.head_cells = min(head_cells, n)
        self.head: CellBlock | None = None
        self._pools: OrderedDict[int, _Pool] = OrderedDict()
        self._building: dict[int, Future] = {}
        self._builders = ThreadPoolExecutor(self.build_threads, "latentcell-pool")

    def positions(self, a: int, b: int) -> CellBlock:
        """Stream positions [a, b); positions >= n wrap to the stream start (padding)."""
        runs = []
        if a < self.n:
            runs.append((a, min(b, self.n)))
        q, left = (max(a, self.n) - self.n), b - max(a, self.n)
        while left > 0:
            q %= self.n
            take = min(left, self.n - q)
            runs.append((q, q + take))
            q, left = q + take, left - take
        parts = [part for q0, q1 in runs for part in self._run(q0, q1)]
        return CellBlock.concat(parts)

    def _run(self, q0: int, q1: int) -> list[CellBlock]:
        if self.head is not None and q1 <= self.head.n_cells:
            return [self.head.slice(q0, q1)]
        parts = []
        while q0 < q1:
            index, offset = divmod(q0, self.pool_cells)
            pool = self._pool(index)
            stop = min(q1 - index * self.pool_cells, pool.cells.n_cells)
            parts.append(pool.cells.slice(offset, stop))
            q0 = index * self.pool_cells + stop
        return parts

    def _pool(self, index: int) -> _Pool:
        if index in self._pools:
            self._pools.move_to_end(index)
            return self._pools[index]
        pending = self._building.pop(index, None)
        if pending is None:  # not asked for in order (the start, a resume, the pad tail)
            self._settle()
            pool = self._build_pool(index)
            self._build_ahead(index + 1)
        else:
            self._build_ahead(index + 1)
            pool = pending.result()
        if index == 0 and self.head_cells and self.head is None:
            self.head = pool.cells.slice(0, self.head_cells)
        self._pools[index] = pool
        while len(self._pools) > 2:
            self._pools.popitem(last=False)
        return pool

    def _settle(self) -> None:
        """Drop the pools being built ahead: the next build runs on this thread, and a unit
        fetcher must never have two callers."""
        for future in self._building.values():
            if not future.cancel():
                future.exception()  # wait; its error, if any, belongs to an unused pool
        self._building.clear()

    def _build_ahead(self, first: int) -> None:
        """Keep pools [first, first + build_threads) built or building."""
        for index in range(first, min(first + self.build_threads, self.n_pools)):
            if index not in self._building and index not in self._pools:
                self._building[index] = self._builders.submit(self._build_pool, index)

    def _build_pool(self, index: int) -> _Pool:
        v0 = self.start + index * self.pool_cells
        v1 = self.start + min((index + 1) * self.pool_cells, self.n)
        k0 = int(np.searchsorted(self.vstart, v0, side="right")) - 1
        k1 = int(np.searchsorted(self.vstart, v1, side="left"))
        pieces = []  # (sequence position, first row, stop row) inside the unit
        for k in range(k0, k1):
            lo = max(v0, self.vstart[k]) - self.vstart[k]
            hi = min(v1, self.vstart[k + 1]) - self.vstart[k]
            if hi > lo:
                pieces.append((k, int(lo), int(hi)))
        cells = self._read_at_once(pieces)
        if cells is None:
            cells = CellBlock.concat([self._units.get(k).slice(lo, hi) for k, lo, hi in pieces])
        if self.pool_seed is None:
            return _Pool(cells)
        rng = np.random.default_rng([*self.pool_seed, index])
        return _Pool(cells.take(rng.permutation(cells.n_cells)))

    def _read_at_once(self, pieces: list[tuple[int, int, int]]) -> CellBlock | None:
        """A pool read into one block by a reader that can (one copy of the values fewer
        than concatenating units): any row ranges (``read_ranges``, the Zarr store) or
        whole units (``read_units``, WebDataset shards). None otherwise, or for a remote
        store, whose units come through the read-ahead fetcher."""
        if self._fetching:
            return None
        read_ranges = getattr(self.reader, "read_ranges", None)
        if read_ranges is not None and self.unit_starts is not None:
            ranges: list[list[int]] = []
            for k, lo, hi in pieces:
                start = int(self.unit_starts[self.order[k]])
                if ranges and ranges[-1][1] == start + lo:  # adjacent in the store: one range
                    ranges[-1][1] = start + hi
                else:
                    ranges.append([start + lo, start + hi])
            return read_ranges([(a, b) for a, b in ranges])
        read_units = getattr(self.reader, "read_units", None)
        whole = all(lo == 0 and hi == self.vstart[k + 1] - self.vstart[k] for k, lo, hi in pieces)
        if read_units is not None and whole:
            return read_units([int(self.order[k]) for k, _, _ in pieces])
        return None

    def __del__(self):
        for future in self._building.values():
            future.cancel()
        self._builders.shutdown(wait=False, cancel_futures=True)


class _SharedUnits:
    """Units by sequence position, read once however many pool builders ask for them.

    Why: a unit cut by a pool boundary belongs to two pools, which two builder threads may
    build at the same time; the first to ask reads it, the other waits for that read. The
    last ``keep`` units are kept (pools ask for units in increasing order).
    """

    def __init__(self, read: Callable[[int], CellBlock], keep: int):
        self._read, self._keep = read, max(2, keep)
        self._lock = threading.Lock()
        self._units: OrderedDict[int, Future] = OrderedDict()

    def get(self, k: int) -> CellBlock:
        with self._lock:
            future = self._units.get(k)
            owner = future is None
            if owner:
                future = self._units[k] = Future()
                while len(self._units) > self._keep:
                    self._units.popitem(last=False)
        if owner:
            try:
                future.set_result(self._read(k))
            except BaseException as err:  # raised in every thread that asked for it
                future.set_exception(err)
        return future.result()


class _UnitFetcher:
    """Reads a slot's units ahead, in sequence order, ``depth`` at a time on a thread pool.

    Why: an object store answers one request in 10-100 ms however small, so reading units one
    after another leaves the loader waiting on the network; ``depth`` reads in flight hide
    that latency when depth x (decode time) covers it. Pools ask for units in increasing
    sequence position; asking for one out of order (a resume, the pad tail) drops what was
    read ahead and starts again from there. Only the pool-building thread calls ``get``.
    """

    def __init__(self, reader: StoreReader, order: np.ndarray, depth: int):
        self.reader, self.order, self.depth = reader, order, depth
        self._threads = ThreadPoolExecutor(depth, thread_name_prefix="latentcell-fetch")
        self._pending: OrderedDict[int, Future] = OrderedDict()

    def get(self, k: int) -> CellBlock:
        """The block of sequence position ``k``; keeps ``depth - 1`` later units in flight."""
        if k not in self._pending:
            self._drop(self._pending)
            self._pending[k] = self._submit(k)
        while next(iter(self._pending)) < k:  # skipped over: not needed any more
            self._pending.popitem(last=False)[1].cancel()
        future = self._pending.pop(k)
        nxt = max(self._pending, default=k) + 1
        while len(self._pending) < self.depth - 1 and nxt < len(self.order):
            self._pending[nxt] = self._submit(nxt)
            nxt += 1
        return future.result()

    def _submit(self, k: int) -> Future:
        return self._threads.submit(self.reader.read_unit, int(self.order[k]))

    @staticmethod
    def _drop(pending: OrderedDict) -> None:
        for future in pending.values():
            future.cancel()
        pending.clear()

    def __del__(self):
        self._drop(self._pending)
        self._threads.shutdown(wait=False, cancel_futures=True)
