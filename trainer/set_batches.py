"""Batches of B (control set, perturbed set) pairs for the set models.

The set sampler yields one pair per item (so its sharding, resume and worker logic stay those
of the cell stream); a training step takes ``sets_per_batch`` of them stacked to (B, S, ...).
Resume stays exact: the wrapped loader counts pairs, and checkpoints fall between steps,
that is, on whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["SetBatches", "require_sets", "stack_pairs"]

_SIDES = ("control", "perturbed")
_SCALARS = ("perturbation", "cell_type", "set_id", "is_pad")


def _stack_side(parts: list[dict]) -> dict:
    out = {k: torch.stack([p[k] for p in parts]) for k in parts[0] if k not in ("obs", "numeric")}
    for nested in ("obs", "numeric"):
        if nested in parts[0]:
            out[nested] = {k: torch.stack([p[nested][k] for p in parts]) for k in parts[0][nested]}
    return out


def stack_pairs(pairs: list[dict]) -> dict:
    """Pair dicts -> one batch: each side's tensors gain a leading set axis; per-pair scalars
    become (B,) tensors; ``match_levels`` (B, S)."""
    batch = {side: _stack_side([p[side] for p in pairs]) for side in _SIDES}
    for key in _SCALARS:
        batch[key] = torch.tensor([p[key] for p in pairs])
    batch["match_levels"] = torch.stack([p["match_levels"] for p in pairs])
    return batch


def require_sets(sampler, store) -> None:
    """A training sampler with no set at all would loop over empty epochs forever: refuse it
    with the reason instead (too few cells, or no perturbed group with matching controls)."""
    if sampler.n_sets == 0:
        from latentcell.data_pipelines.errors import DataValidationError

        raise DataValidationError(
            store, "data.path", f"no sets of cells to train on ({sampler.meta.n_cells} cells in "
            "the store; a set needs a group of cells, and for perturbations, a perturbed group "
            "whose cell type has control cells in the training split)",
            "train on a store with more cells and groups, or check the split file",
        )  # fmt: skip


class SetBatches:
    """A resumable loader of stacked pairs over a set sampler's ``StreamLoader``."""

    def __init__(self, pairs, sets_per_batch: int, transform=None, stack=stack_pairs) -> None:
        """``transform``: applied to each stacked batch (e.g. adding VAE latents);
        ``stack``: how items become one batch (pairs by default; ``group_sets.stack_sets``
        for the pretraining sampler's single sets)."""
        if sets_per_batch < 1:
            raise ValueError(f"sets_per_batch must be >= 1, got {sets_per_batch}")
        self.pairs, self.sets_per_batch, self.stack = pairs, sets_per_batch, stack
        self.transform = transform or (lambda batch: batch)

    def __len__(self) -> int:
        return math.ceil(len(self.pairs) / self.sets_per_batch)

    def __iter__(self) -> Iterator[dict]:
        group: list[dict] = []
        for pair in self.pairs:
            group.append(pair)
            if len(group) == self.sets_per_batch:
                yield self.transform(self.stack(group))
                group = []
        if group:  # every rank has equally many pairs (padded tails): same short batch
            yield self.transform(self.stack(group))

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.pairs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pairs.load_state_dict(state)

    def corrupt_units(self) -> list[dict]:
        """Damaged units the underlying loader skipped (``data.on_corrupt = "skip"``)."""
        return self.pairs.corrupt_units()
