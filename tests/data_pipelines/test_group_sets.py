"""GroupSetSampler rules: one group per set, every cell once per epoch (plus top-ups),
determinism, disjoint shards over ranks and real DataLoader workers, exact resume, group
subsets and the held-out-group split."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.group_sets import (
    GroupSetConfig,
    GroupSetSampler,
    group_sizes,
    split_groups,
    stack_sets,
)
from latentcell.data_pipelines.memory_source import InMemoryStore

pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

SET_SIZE = 8
# (cell type, sample) -> cells; no perturbation column (scBaseCount-like). Sizes cover a
# multiple of the set size, short last sets and groups smaller than one set.
LAYOUT = {
    ("T", "SRX1"): 24,
    ("T", "SRX2"): 13,
    ("T", "SRX3"): 3,
    ("B", "SRX1"): 9,
    ("B", "SRX2"): 20,
    ("M", "SRX2"): 1,
    ("M", "SRX3"): 17,
}


def _store(layout=LAYOUT, seed=0) -> InMemoryStore:
    keys = [k for k, n in layout.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    obs = pd.DataFrame(keys, columns=["cell_type", "SRX_accession"])
    X = sp.random(len(obs), 10, density=0.5, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    store = InMemoryStore.from_obs(
        X, obs, roles={"cell_type": "cell_type", "batch": "SRX_accession"}, unit_cells=16
    )
    return store.sorted_by_group()


def _config(**kw) -> GroupSetConfig:
    return GroupSetConfig(**{"set_size": SET_SIZE, "tail": "partial", "buffer_sets": 4, **kw})


def _group_of(store, row) -> tuple[str, str]:
    cats, codes = store.meta.categories, store.codes
    return (
        cats["cell_type"][codes["cell_type"][row]],
        cats["SRX_accession"][codes["SRX_accession"][row]],
    )


def test_sets_hold_one_group_and_cover_every_cell_once():
    store = _store()
    sampler = GroupSetSampler(store, _config())
    items = list(sampler)
    assert len(items) == sum(math.ceil(n / SET_SIZE) for n in LAYOUT.values()) == sampler.n_sets
    assert sorted(int(i["set_id"]) for i in items) == list(range(sampler.n_sets))
    drawn: dict[tuple[str, str], list[int]] = {}
    for item in items:
        rows = item["cells"]["row"].numpy()
        assert item["cells"]["X"].shape == (SET_SIZE, 10) and not item["is_pad"]
        groups = {_group_of(store, r) for r in rows}
        assert len(groups) == 1  # one (cell type, sample) per set
        key = groups.pop()
        ct, srx = store.meta.categories["cell_type"], store.meta.categories["SRX_accession"]
        assert (ct[item["cell_type"]], srx[item["batch"]]) == key and item["perturbation"] == -1
        plan = sampler.set_plan(int(item["set_id"]))
        np.testing.assert_array_equal(plan["rows"], rows)
        np.testing.assert_array_equal(item["cells"]["X"].numpy(), store.X[rows].toarray())
        # The drawn part of set j is the group's cells j*S .. (j+1)*S of the epoch's order;
        # the rest are top-ups drawn with replacement from the same group.
        j = int(sampler._set_j[item["set_id"]])
        n_drawn = min(SET_SIZE, LAYOUT[key] - j * SET_SIZE)
        drawn.setdefault(key, []).extend(rows[:n_drawn].tolist())
    for key in LAYOUT:
        group_rows = [r for r in range(store.meta.n_cells) if _group_of(store, r) == key]
        counts = Counter(drawn[key])
        assert sorted(counts) == group_rows and set(counts.values()) == {1}  # once each


def test_deterministic_epochs_and_unshuffled_order():
    store = _store()

    def plan(epoch, **kw):
        sampler = GroupSetSampler(store, _config(**kw))
        sampler.set_epoch(epoch)
        return [(int(i["set_id"]), i["cells"]["row"].tolist()) for i in sampler]

    assert plan(0) == plan(0)
    assert plan(1) == plan(1) and plan(1) != plan(0)
    assert plan(0, seed=1) != plan(0)
    ordered = plan(0, shuffle=False)
    assert [s for s, _ in ordered] == list(range(len(ordered)))
    first = ordered[0][1]  # row order inside the first group
    assert first == sorted(first) and first == list(range(first[0], first[0] + SET_SIZE))


@pytest.mark.parametrize("tail", ["partial", "pad"])
def test_two_ranks_two_workers_shard_disjointly(tail):
    store = _store()
    config = _config(tail=tail)
    per_rank = []
    for rank in range(2):
        sampler = GroupSetSampler(store, config, rank=rank, world_size=2, num_workers=2)
        items = list(sampler.loader())  # real DataLoader worker processes
        assert len(items) == len(sampler)
        per_rank.append([(int(i["set_id"]), bool(i["is_pad"])) for i in items])
    real = [[s for s, pad in rank if not pad] for rank in per_rank]
    assert not set(real[0]) & set(real[1])
    assert sorted(real[0] + real[1]) == list(range(GroupSetSampler(store, config).n_sets))
    if tail == "pad":
        assert len(per_rank[0]) == len(per_rank[1])  # DDP never waits on a short rank
        assert all(s in set(real[r]) for r in range(2) for s, pad in per_rank[r] if pad)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(workers):
    store = _store()
    config = _config(tail="pad")
    sampler = GroupSetSampler(store, config, num_workers=workers)
    sampler.set_epoch(1)
    full = [(int(i["set_id"]), i["cells"]["row"].tolist()) for i in sampler.loader()]
    for consumed in (1, 5, len(full) - 1):
        loader = GroupSetSampler(store, config, num_workers=workers).loader()
        loader.set_epoch(1)
        head = []
        for item in loader:
            head.append((int(item["set_id"]), item["cells"]["row"].tolist()))
            if len(head) == consumed:
                break
        state = loader.state_dict()
        assert state["batches_consumed"] == consumed and state["epoch"] == 1
        resumed = GroupSetSampler(store, config, num_workers=workers).loader()
        resumed.load_state_dict(state)
        tail = [(int(i["set_id"]), i["cells"]["row"].tolist()) for i in resumed]
        assert head + tail == full
    other = GroupSetSampler(store, _config(tail="pad", set_size=4), num_workers=workers)
    with pytest.raises(ValueError, match="cannot resume exactly"):
        other.loader().load_state_dict(state)


def test_group_subset_split_and_small_groups():
    store = _store()
    index = store.group_index()
    sizes = group_sizes(index)
    assert sizes["n_cells"].sum() == store.meta.n_cells and len(sizes) == len(LAYOUT)
    split = split_groups(index, 0.25, seed=0)
    assert split.val and split.train and not set(split.val) & set(split.train)
    assert len(split.val) + len(split.train) == len(LAYOUT)
    assert 0 < split.n_val_cells <= 0.25 * store.meta.n_cells
    assert split.n_val_cells + split.n_train_cells == store.meta.n_cells
    assert split_groups(index, 0.25, seed=0) == split  # a pure function
    assert split_groups(index, 0.0).val == []
    tiny = split_groups(index, 0.001)  # no group is that small: the smallest one
    assert tiny.n_val_cells == min(LAYOUT.values())
    with pytest.raises(ValueError, match="group"):
        split_groups(index[:1], 0.5)

    val = GroupSetSampler(store, _config(), groups=split.val)
    seen = {tuple(int(i[k]) for k in ("cell_type", "perturbation", "batch")) for i in val}
    assert seen == set(split.val)
    assert val.n_cells == split.n_val_cells
    assert val._layout() != GroupSetSampler(store, _config(), groups=split.train)._layout()
    with pytest.raises(ValueError, match="not"):
        GroupSetSampler(store, _config(), groups=[(9, -1, 9)])

    big = GroupSetSampler(store, _config(min_group_cells=4))
    assert sorted(big.group_table()["n_cells"]) == sorted(n for n in LAYOUT.values() if n >= 4)
    table = GroupSetSampler(store, _config()).group_table()
    assert set(zip(table["cell_type_name"], table["batch_name"], strict=True)) == set(LAYOUT)


def test_stack_sets_shapes():
    store = _store()
    items = list(GroupSetSampler(store, _config()))[:3]
    batch = stack_sets(items)
    assert batch["cells"]["X"].shape == (3, SET_SIZE, 10)
    assert batch["cells"]["library_size"].shape == (3, SET_SIZE)
    assert batch["cells"]["obs"]["cell_type"].shape == (3, SET_SIZE)
    for key in ("cell_type", "batch", "set_id", "is_pad"):
        assert batch[key].shape == (3,)
    assert batch["cell_type"].tolist() == [i["cell_type"] for i in items]
