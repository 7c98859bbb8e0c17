"""The in-memory pair loader: ranks share an epoch's pairs without overlap gaps, every rank
yields the same number of batches, a resumed loader continues with the very next batch, and
validation passes always start from the first batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.trainer.pair_batches import PairBatches


def _arrays(n: int) -> dict[str, np.ndarray]:
    return {"a": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
            "code": np.arange(n, dtype=np.int64)}  # fmt: skip


def test_ranks_cover_every_pair_with_equal_batch_counts():
    n, batch, world = 103, 8, 3
    loaders = [PairBatches(_arrays(n), batch, rank, world, seed=5) for rank in range(world)]
    batches = [list(loader) for loader in loaders]
    assert {len(b) for b in batches} == {len(loaders[0])} == {5}  # ceil(103 / 24)
    real = torch.cat([b["code"][~b["is_pad"]] for bs in batches for b in bs])
    assert sorted(real.tolist()) == list(range(n))  # each pair once, pads marked
    pads = torch.cat([b["is_pad"] for bs in batches for b in bs])
    assert int(pads.sum()) == 5 * 8 * 3 - n
    first = batches[0][0]
    assert torch.equal(first["a"][:, 0].long(), first["code"])  # columns stay aligned


def test_epochs_reshuffle_and_resume_continues_with_the_next_batch():
    loader = PairBatches(_arrays(50), 4, seed=1)
    epoch0 = [b["code"] for b in loader]
    loader.set_epoch(1)
    it = iter(loader)
    taken = [next(it)["code"] for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": 3}
    rest = [b["code"] for b in it]
    resumed = PairBatches(_arrays(50), 4, seed=1)
    resumed.load_state_dict(state)
    again = [b["code"] for b in resumed]
    assert len(again) == len(rest) and all(
        torch.equal(x, y) for x, y in zip(again, rest, strict=True)
    )
    epoch1 = torch.cat(taken + rest)
    assert not torch.equal(torch.cat(epoch0)[:20], epoch1[:20])  # a new order per epoch


def test_validation_passes_restart():
    loader = PairBatches(_arrays(10), 4, shuffle=False)
    first = [b["code"].tolist() for b in loader]
    second = [b["code"].tolist() for b in loader]
    assert first == second == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="different lengths"):
        PairBatches({"a": np.zeros(3), "b": np.zeros(4)}, 2)
    with pytest.raises(ValueError):
        PairBatches(_arrays(3), 2, rank=2, world_size=2)
    assert len(PairBatches(_arrays(0), 2)) == 0
