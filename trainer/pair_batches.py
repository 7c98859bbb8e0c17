"""A resumable loader over paired arrays held in memory (the latent-delta family's training
pairs: a few float32 columns per pair, far smaller than the counts they came from).

Why not the cell stream: the pairs are not rows of a store but a join of two of its rows
computed once (``latent_shift_cells.pair_cells``), and they fit in memory by construction.
Each epoch is one seeded permutation of all pairs, padded by wrapping to a multiple of
``world_size * batch_size`` and dealt in contiguous per-rank slices, so every rank yields
the same number of batches (DDP needs that) and the union over ranks covers every pair. The
state is (epoch, batches consumed): a resumed run continues with the very next batch. A
validation loader (``shuffle=False``) starts every pass at its first batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

__all__ = ["PairBatches"]


class PairBatches:
    """Batches of dicts of tensors (``arrays``' keys) for one rank; pads are marked by
    ``is_pad`` and carry a real pair's values."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays of different lengths: {sorted(lengths)}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError("batch_size >= 1 and 0 <= rank < world_size")
        self.arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
        self.n = lengths.pop()
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.consumed = 0, 0

    def __len__(self) -> int:
        if self.n == 0:
            return 0
        return -(-self.n // (self.batch_size * self.world_size))

    def _order(self) -> np.ndarray:
        """This rank's pair indices for the current epoch (``len(self) * batch_size``)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = len(self) * self.batch_size * self.world_size
        order = np.resize(order, total)  # wraps around: pads repeat the first pairs
        per_rank = total // self.world_size
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[dict]:
        order = self._order()
        if not self.shuffle:
            self.consumed = 0
        position = np.arange(len(order)) + self.rank * len(order)
        while self.consumed < len(self):
            sl = slice(self.consumed * self.batch_size, (self.consumed + 1) * self.batch_size)
            rows = order[sl]
            batch = {k: torch.from_numpy(a[rows]) for k, a in self.arrays.items()}
            batch["is_pad"] = torch.from_numpy(position[sl] >= self.n)
            batch["row"] = torch.from_numpy(rows.astype(np.int64))
            self.consumed += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
