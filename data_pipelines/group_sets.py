"""Sets of cells from one group of a store, for set-level self-supervised pretraining.

An observational store (scBaseCount: ``SRX_accession`` is the batch, ``cell_type``; no
perturbation column) has no (control set, perturbed set) pairs, but an ST model can still
learn set structure from sets of cells that belong together. This sampler yields such sets.

Rules
-----
- A group is one key of ``reader.group_index()``: (cell type, perturbation, batch). On an
  observational store the perturbation code is -1 everywhere, so a group is one
  (cell type, batch) pair, i.e. one cell type of one sample. On a perturbation store a set
  stays homogeneous (one perturbation). A group is one or more contiguous row ranges (one
  per input file that holds it). Groups with fewer than ``min_group_cells`` cells are left
  out.
- Within an epoch a group's cells are sampled without replacement: they are permuted by
  (seed, epoch, group) (row order with ``shuffle=False``) and cut into
  ``ceil(n_group / set_size)`` sets, so every cell of the group is in exactly one set. The
  last set, when short (and the only set of a group smaller than ``set_size``), is topped up
  with cells drawn with replacement from the group by (seed, epoch, set), as ``SetSampler``
  and cell-load do.
- Output per set (one item): ``cells``, the batch dict of its ``set_size`` cells
  (``batches.make_batch``: ``X`` dense (S, G) counts by default, ``library_size``, ``obs``
  with the role codes, ``row``, ``is_pad``), plus the Python scalars ``cell_type``,
  ``perturbation`` and ``batch`` (the group's codes, -1 where the store has no such column),
  ``group`` (index into ``group_keys``), ``set_id`` (index into the canonical set list) and
  ``is_pad``. ``stack_sets`` stacks items to (B, S, ...) batches.
- Epoch order: groups permuted by (seed, epoch); their sets listed in that order, cut into
  pools of ``buffer_sets`` sets, each pool permuted by (seed, epoch, pool) (all skipped with
  ``shuffle=False``). Pools keep a group's sets close together, so the range cache reads each
  group about once per epoch.
- Sharding, tails, determinism and resume are those of ``CellStream`` through
  ``ShardedIterable`` with one set as the item: slots = (rank, worker) take contiguous ranges
  of the epoch's set list; ``pad`` repeats a slot's own first sets (``is_pad=True``) so every
  rank yields equally many sets.

Group subset: ``GroupSetSampler(source, config, groups=keys)`` keeps only the listed
(cell type, perturbation, batch) code triples (e.g. the training groups of
``split_groups``). Keys, not rows, so a split of a 500M-cell store costs no row arrays.

IO: a set is one ``RangeCache.gather`` over the group's ranges (reads of at most
``max_read_cells`` rows, kept in an LRU cache of ``cache_mb`` MB per reader).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .batches import make_batch
from .blocks import ROLES, StoreReader
from .errors import DataValidationError
from .set_epochs import RowRanges, SetEpochs, SetsConfig, read_pieces

__all__ = [
    "GROUP_KEYS",
    "GroupSetConfig",
    "GroupSetSampler",
    "GroupSplit",
    "group_sizes",
    "split_groups",
    "stack_sets",
]

GROUP_KEYS = ROLES  # ("cell_type", "perturbation", "batch")
_SCALARS = ("cell_type", "perturbation", "batch", "group", "set_id", "is_pad")

# The random stream of the group split; 0-3 are set_epochs' (group order, pools, members).
_SPLIT = 4

Key = tuple[int, int, int]


@dataclass(frozen=True)
class GroupSetConfig(SetsConfig):
    """What the group set sampler yields; see the module docstring for the rules and
    ``SetsConfig`` for the options every set sampler has. min_group_cells: smaller groups
    are left out."""

    min_group_cells: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.min_group_cells < 1:
            raise ValueError(f"min_group_cells must be >= 1, got {self.min_group_cells}")


def group_sizes(index: pd.DataFrame) -> pd.DataFrame:
    """Cells per group key of a group index: columns GROUP_KEYS + ``n_cells``, key order."""
    sizes = (index["stop"] - index["start"]).rename("n_cells")
    frame = pd.concat([index[list(GROUP_KEYS)], sizes], axis=1)
    return frame.groupby(list(GROUP_KEYS), sort=True, as_index=False)["n_cells"].sum()


def _keys(frame: pd.DataFrame) -> list[Key]:
    cols = [frame[k].to_numpy(np.int64) for k in GROUP_KEYS]
    return [(int(a), int(b), int(c)) for a, b, c in zip(*cols, strict=True)]


@dataclass(frozen=True)
class GroupSplit:
    """Train and held-out groups (code triples), and their cell counts."""

    train: list[Key]
    val: list[Key]
    n_train_cells: int
    n_val_cells: int


def split_groups(index: pd.DataFrame, val_fraction: float, seed: int = 0) -> GroupSplit:
    """Hold out whole groups, about ``val_fraction`` of the cells.

    Groups are visited in an order permuted by (seed, number of groups); each is held out
    when that keeps the held-out cells at or below ``val_fraction`` of all cells. Where no
    group is that small, the smallest one is held out, so ``val_fraction > 0`` always holds
    out at least one group; at least one group stays for training. A pure function of the
    group index, the fraction and the seed: every rank and every resumed run agrees on it.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sizes = group_sizes(index)
    keys, n = _keys(sizes), sizes["n_cells"].to_numpy(np.int64)
    if val_fraction == 0.0:
        return GroupSplit(keys, [], int(n.sum()), 0)
    if len(keys) < 2:
        raise DataValidationError(
            "store", "data.val_fraction", f"cannot hold out whole groups: the store has "
            f"{len(keys)} group(s) (cell type x batch)", "set data.val_fraction=0",
        )  # fmt: skip
    target = val_fraction * float(n.sum())
    held = np.zeros(len(keys), dtype=bool)
    total = 0
    for g in np.random.default_rng([seed, len(keys), _SPLIT]).permutation(len(keys)):
        if total + n[g] <= target:
            held[g], total = True, total + int(n[g])
    if not held.any():
        held[int(np.argmin(n))] = True
    return GroupSplit(
        train=[k for k, h in zip(keys, held, strict=True) if not h],
        val=[k for k, h in zip(keys, held, strict=True) if h],
        n_train_cells=int(n[~held].sum()),
        n_val_cells=int(n[held].sum()),
    )


class GroupSetSampler(SetEpochs):
    """Yields sets of ``set_size`` cells of one group; see the module docstring."""

    def __init__(
        self,
        source: StoreReader | Callable[[], StoreReader],
        config: GroupSetConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        groups: Iterable[Sequence[int]] | None = None,
    ):
        """groups: keep only these (cell type, perturbation, batch) code triples (codes -1
        where the store has no such column); None = every group."""
        super().__init__(source, config or GroupSetConfig(), rank, world_size, num_workers)
        index = self._reader.group_index().sort_values("start", kind="stable")
        self.subset_digest = None
        if groups is not None:
            index = self._restrict(index, groups)
        self._build_groups(index)
        self._piece_starts, self._piece_stops = read_pieces(
            index, GROUP_KEYS, self.config.max_read_cells
        )
        self._shard_sets()

    # -- construction -----------------------------------------------------------------------

    def _restrict(self, index: pd.DataFrame, groups: Iterable[Sequence[int]]) -> pd.DataFrame:
        wanted = sorted({tuple(int(c) for c in key) for key in groups})
        if any(len(key) != len(GROUP_KEYS) for key in wanted):
            raise ValueError("groups must be (cell_type, perturbation, batch) code triples")
        known = set(_keys(index))
        unknown = [key for key in wanted if key not in known]
        if unknown:
            raise ValueError(
                f"{self.meta.path}: groups {unknown[:5]} are not (cell_type, perturbation, "
                "batch) keys of this store's group index"
            )
        self.subset_digest = hashlib.sha256(repr(wanted).encode()).hexdigest()[:16]
        keep = set(wanted)
        return index[np.array([key in keep for key in _keys(index)], dtype=bool)]

    def _build_groups(self, index: pd.DataFrame) -> None:
        """Groups (in key order) with at least ``min_group_cells`` cells, and their sets."""
        self.group_keys: list[Key] = []
        kept: list[RowRanges] = []
        for key, frame in index.groupby(list(GROUP_KEYS), sort=True):
            cells = RowRanges.build(frame["start"], frame["stop"], frame["batch"])
            if cells.n >= self.config.min_group_cells:
                self.group_keys.append(tuple(int(k) for k in key))
                kept.append(cells)
        if not self.group_keys:
            raise DataValidationError(
                self.meta.path, "data.min_group_cells", "no group has at least "
                f"min_group_cells={self.config.min_group_cells} cells",
                "lower data.min_group_cells, or train on a store with larger groups",
            )  # fmt: skip
        self.n_cells = int(self._cut_into_sets(kept).sum())

    def group_table(self) -> pd.DataFrame:
        """One row per group: its codes, category names, cells and sets per epoch."""
        frame = pd.DataFrame(self.group_keys, columns=list(GROUP_KEYS))
        for role in GROUP_KEYS:
            column = self.meta.roles.get(role)
            names = self.meta.categories[column] if column else []
            frame[f"{role}_name"] = [names[c] if c >= 0 else "" for c in frame[role]]
        frame["n_cells"] = [g.n for g in self.group_cells]
        frame["n_sets"] = self.group_sets
        return frame

    def _layout(self) -> dict:
        return super()._layout() | {
            "min_group_cells": self.config.min_group_cells,
            "groups": "all" if self.subset_digest is None else self.subset_digest,
        }

    # -- the epoch plan (set_epochs) and items ---------------------------------------------

    def set_plan(self, set_id: int, epoch: int | None = None) -> dict:
        """Rows of a set's cells and its group (no data read)."""
        g, rows, _ = self.set_members(set_id, self.epoch if epoch is None else epoch)
        return {"rows": rows, "group": g}

    def item(self, set_id: int, is_pad: bool = False) -> dict:
        """The item dict of one set of the current epoch."""
        plan = self.set_plan(set_id)
        ct, pt, b = self.group_keys[plan["group"]]
        block = self._range_cache().gather(plan["rows"])
        is_pad = is_pad or bool((block.rows < 0).any())  # rows < 0: skipped damaged units
        return {
            "cells": make_batch(block, self.spec, np.full(self.config.set_size, is_pad)),
            "cell_type": ct,
            "perturbation": pt,
            "batch": b,
            "group": plan["group"],
            "set_id": set_id,
            "is_pad": bool(is_pad),
        }


def stack_sets(items: list[dict]) -> dict:
    """Items -> one batch: ``cells`` tensors gain a leading set axis (B, S, ...); the
    per-set scalars become (B,) tensors."""
    cells = [item["cells"] for item in items]
    out = {k: torch.stack([c[k] for c in cells]) for k in cells[0] if k not in ("obs", "numeric")}
    for nested in ("obs", "numeric"):
        if nested in cells[0]:
            out[nested] = {k: torch.stack([c[nested][k] for c in cells]) for k in cells[0][nested]}
    batch = {"cells": out}
    for key in _SCALARS:
        batch[key] = torch.tensor([item[key] for item in items])
    return batch
