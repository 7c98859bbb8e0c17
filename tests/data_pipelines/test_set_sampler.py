"""SetSampler rules: one group per set, coverage, matched controls and fallbacks, sharding."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from latentcell.data_pipelines.batches import to_dense
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig

pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

SET_SIZE = 16
# (cell type, perturbation, batch) -> cells. A has no controls in b2; B has controls in b0 only.
LAYOUT = {
    ("A", "ctrl", "b0"): 30,
    ("A", "ctrl", "b1"): 20,
    ("B", "ctrl", "b0"): 15,
    ("A", "g1", "b0"): 25,
    ("A", "g1", "b1"): 10,
    ("A", "g1", "b2"): 12,
    ("A", "g2", "b2"): 5,
    ("A", "g3", "b0"): 32,
    ("B", "g1", "b0"): 8,
    ("B", "g1", "b1"): 20,
    ("B", "g1", "b2"): 9,
    ("B", "g2", "b1"): 16,
}


def _store(layout=LAYOUT, sort=True, seed=0) -> InMemoryStore:
    keys = [k for k, n in layout.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    obs = pd.DataFrame(keys, columns=["ct", "pert", "bt"])
    X = sp.random(len(obs), 12, density=0.4, format="csr", random_state=seed, dtype=np.float32)
    store = InMemoryStore.from_obs(
        X,
        obs,
        roles={"cell_type": "ct", "perturbation": "pert", "batch": "bt"},
        control_label="ctrl",
        unit_cells=25,
    )
    return store.sorted_by_group() if sort else store


def _labels(store, rows) -> list[tuple[str, str, str]]:
    cats = store.meta.categories
    return [
        (
            cats["ct"][store.codes["ct"][r]],
            cats["pert"][store.codes["pert"][r]],
            cats["bt"][store.codes["bt"][r]],
        )
        for r in rows
    ]


def _pairs(store, **kw) -> list[dict]:
    config = SetSamplerConfig(**{"set_size": SET_SIZE, "tail": "partial", **kw})
    return list(SetSampler(store, config))


@pytest.mark.parametrize("sort", [True, False])
def test_sets_hold_one_group_and_cover_it(sort):
    store = _store(sort=sort)
    pairs = _pairs(store)
    groups: dict[tuple[str, str], list[int]] = {}
    cats = store.meta.categories
    for pair in pairs:
        rows = pair["perturbed"]["row"].numpy()
        assert len(rows) == SET_SIZE
        key = (cats["ct"][int(pair["cell_type"])], cats["pert"][int(pair["perturbation"])])
        assert key[1] != "ctrl"
        assert {lab[:2] for lab in _labels(store, rows)} == {key}
        groups.setdefault(key, []).extend(rows.tolist())
    sizes: dict[tuple[str, str], int] = {}
    for (ct, pert, _), n in LAYOUT.items():
        if pert != "ctrl":
            sizes[(ct, pert)] = sizes.get((ct, pert), 0) + n
    assert set(groups) == set(sizes)
    assert len(pairs) == sum(math.ceil(n / SET_SIZE) for n in sizes.values())
    for key, rows in groups.items():
        members = {
            r for r, lab in enumerate(_labels(store, range(store.meta.n_cells))) if lab[:2] == key
        }
        assert set(rows) == members  # every cell of the group is used
        assert len(rows) == math.ceil(sizes[key] / SET_SIZE) * SET_SIZE
        if sizes[key] % SET_SIZE == 0:  # no top-up: each cell exactly once
            assert sorted(rows) == sorted(members)


def test_controls_matched_by_batch_then_cell_type():
    store = _store()
    for pair in _pairs(store):
        pert = _labels(store, pair["perturbed"]["row"].numpy())
        ctrl = _labels(store, pair["control"]["row"].numpy())
        levels = pair["match_levels"].tolist()
        for p, c, level in zip(pert, ctrl, levels, strict=True):
            assert c[1] == "ctrl" and c[0] == p[0]  # a control of the same cell type
            has_batch_controls = (p[0], "ctrl", p[2]) in LAYOUT
            assert level == (0 if has_batch_controls else 1)
            if level == 0:
                assert c[2] == p[2]
        assert pair["match_level"] == ("batch", "cell_type")[max(levels)]
    # B g1 spans b0 (controls) and b1/b2 (none): its sets mix both levels
    assert any(set(p["match_levels"].tolist()) == {0, 1} for p in _pairs(store))


def test_cell_type_without_controls():
    layout = {**LAYOUT, ("C", "g1", "b0"): 7}
    store = _store(layout)
    with pytest.raises(ValueError, match=r"\['C'\].*no control cells"):
        SetSampler(store, SetSamplerConfig(set_size=SET_SIZE))
    pairs = _pairs(store, allow_global_controls=True)
    c_code = store.meta.categories["ct"].index("C")
    c_pairs = [p for p in pairs if int(p["cell_type"]) == c_code]
    assert len(c_pairs) == 1 and c_pairs[0]["match_level"] == "global"
    assert {lab[1] for lab in _labels(store, c_pairs[0]["control"]["row"].numpy())} == {"ctrl"}


def test_determinism_and_epochs():
    store = _store()

    def signature(sampler):
        return [
            (int(p["set_id"]), p["perturbed"]["row"].tolist(), p["control"]["row"].tolist())
            for p in sampler
        ]

    config = SetSamplerConfig(set_size=SET_SIZE)
    first, again = signature(SetSampler(store, config)), signature(SetSampler(store, config))
    assert first == again
    other = SetSampler(store, config)
    other.set_epoch(1)
    assert signature(other) != first


@pytest.mark.parametrize("tail", ["partial", "pad"])
def test_sharding_across_ranks_is_disjoint(tail):
    store = _store()
    config = SetSamplerConfig(set_size=SET_SIZE, tail=tail)
    per_rank = []
    for rank in range(2):
        sampler = SetSampler(store, config, rank=rank, world_size=2, num_workers=2)
        pairs = list(sampler.loader())
        assert len(pairs) == len(sampler)
        per_rank.append([int(p["set_id"]) for p in pairs if not p["is_pad"]])
        if tail == "pad":
            pad = [p for p in pairs if p["is_pad"]]
            assert all(p["perturbed"]["is_pad"].all() and p["control"]["is_pad"].all() for p in pad)
    assert not set(per_rank[0]) & set(per_rank[1])
    n_sets = SetSampler(store, config).n_sets
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n_sets))
    if tail == "pad":
        counts = [
            len(SetSampler(store, config, rank=r, world_size=2, num_workers=2)) for r in range(2)
        ]
        assert counts[0] == counts[1]


def test_dense_equals_csr():
    store = _store()
    dense, csr = _pairs(store, output="dense"), _pairs(store, output="csr")
    X = store.X.toarray()
    for d, c in zip(dense, csr, strict=True):
        for side in ("control", "perturbed"):
            assert c[side]["X"].layout == torch.sparse_csr
            assert torch.equal(to_dense(c[side]), d[side]["X"])
            np.testing.assert_array_equal(d[side]["X"].numpy(), X[d[side]["row"].numpy()])


def test_range_cache_reads_each_piece_once():
    store = _store()
    sampler = SetSampler(store, SetSamplerConfig(set_size=SET_SIZE))
    list(sampler)
    assert sampler._cache.reads <= len(sampler._piece_starts)
    small = SetSampler(store, SetSamplerConfig(set_size=SET_SIZE, max_read_cells=8))
    rows = [p["perturbed"]["row"].tolist() for p in small]
    assert rows == [p["perturbed"]["row"].tolist() for p in sampler]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(workers):
    store = _store()
    config = SetSamplerConfig(set_size=SET_SIZE, tail="partial")
    full = [int(p["set_id"]) for p in SetSampler(store, config, num_workers=workers).loader()]
    for consumed in (1, 3, len(full)):
        sampler = SetSampler(store, config, num_workers=workers)
        sampler.resume(0, consumed)
        rest = [int(p["set_id"]) for p in sampler.loader()]
        assert full[:consumed] + rest == full


# -- rows=: restriction to a subset of rows --------------------------------------------------


def _signature(sampler) -> list[tuple]:
    return [
        (int(p["set_id"]), p["perturbed"]["row"].tolist(), p["control"]["row"].tolist())
        for p in sampler
    ]


def _rows_where(store, keep) -> np.ndarray:
    """Rows whose (cell type, perturbation, batch) labels satisfy ``keep``."""
    labels = _labels(store, range(store.meta.n_cells))
    return np.array([r for r, lab in enumerate(labels) if keep(lab)], dtype=np.int64)


def test_rows_covering_the_store_change_nothing():
    store = _store()
    config = SetSamplerConfig(set_size=SET_SIZE)
    full = SetSampler(store, config)
    every = SetSampler(store, config, rows=np.arange(store.meta.n_cells)[::-1])
    mask = SetSampler(store, config, rows=np.ones(store.meta.n_cells, dtype=bool))
    assert _signature(every) == _signature(mask) == _signature(full)
    assert "row_subset" not in full.state_dict()["layout"]  # old checkpoints still load


def test_rows_restrict_perturbed_sets_and_control_pools():
    store = _store()
    rng = np.random.default_rng(7)
    subset = np.sort(rng.choice(store.meta.n_cells, size=140, replace=False))
    sampler = SetSampler(store, SetSamplerConfig(set_size=SET_SIZE, tail="partial"), rows=subset)
    pairs = list(sampler)
    allowed = set(subset.tolist())
    seen: dict[tuple[str, str], set[int]] = {}
    for pair in pairs:
        rows, ctrl = pair["perturbed"]["row"].numpy(), pair["control"]["row"].numpy()
        assert set(rows.tolist()) <= allowed and set(ctrl.tolist()) <= allowed
        key = _labels(store, rows[:1])[0][:2]
        seen.setdefault(key, set()).update(rows.tolist())
        for p, c in zip(_labels(store, rows), _labels(store, ctrl), strict=True):
            assert c[1] == "ctrl" and c[0] == p[0]
    # each group's subset cells are all used, and the epoch has ceil(n / set_size) sets each
    groups: dict[tuple[str, str], set[int]] = {}
    for r, lab in zip(subset, _labels(store, subset), strict=True):
        if lab[1] != "ctrl":
            groups.setdefault(lab[:2], set()).add(int(r))
    assert seen == groups
    assert len(pairs) == sampler.n_sets == sum(-(-len(g) // SET_SIZE) for g in groups.values())
    # reads stay range-based: whole-store pieces trimmed to the subset, each read at most once
    starts, stops = sampler._piece_starts, sampler._piece_stops
    assert sampler._cache.reads <= len(starts)
    piece = np.searchsorted(starts, subset, side="right") - 1
    assert (piece >= 0).all() and (subset < stops[piece]).all()  # every subset row is readable
    whole = SetSampler(store, SetSamplerConfig(set_size=SET_SIZE))
    assert (stops - starts).sum() < (whole._piece_stops - whole._piece_starts).sum()


def test_rows_match_fallbacks_use_the_restricted_pool():
    store = _store()
    removed = ("A", "ctrl", "b0")  # A cells of b0 must fall back to A controls of b1
    rows = _rows_where(store, lambda lab: lab != removed)
    pairs = _pairs_of(SetSampler(store, SetSamplerConfig(set_size=SET_SIZE), rows=rows))
    for pair in pairs:
        pert = _labels(store, pair["perturbed"]["row"].numpy())
        ctrl = _labels(store, pair["control"]["row"].numpy())
        for p, c, level in zip(pert, ctrl, pair["match_levels"].tolist(), strict=True):
            assert c[:2] == (p[0], "ctrl") and c != removed
            same_batch = (p[0], "ctrl", p[2])
            assert level == (0 if same_batch in LAYOUT and same_batch != removed else 1)
            if level == 0:
                assert c[2] == p[2]
    assert any(
        _labels(store, p["perturbed"]["row"].numpy()[:1])[0][:2] == ("A", "g3")
        and p["match_level"] == "cell_type"
        for p in pairs
    )  # A g3 lives in b0 only: all its controls now come from b1
    # B loses every control: the error names the subset; global fallback uses subset controls
    no_b = _rows_where(store, lambda lab: lab[:2] != ("B", "ctrl"))
    with pytest.raises(ValueError, match=r"\['B'\].*restricted to.*15 controls of them"):
        SetSampler(store, SetSamplerConfig(set_size=SET_SIZE), rows=no_b)
    config = SetSamplerConfig(set_size=SET_SIZE, allow_global_controls=True)
    for pair in SetSampler(store, config, rows=no_b):
        assert set(pair["control"]["row"].tolist()) <= set(no_b.tolist())
        if store.meta.categories["ct"][pair["cell_type"]] == "B":
            assert pair["match_level"] == "global"
    no_ctrl = _rows_where(store, lambda lab: lab[1] != "ctrl")
    with pytest.raises(ValueError, match="no control cells .* at all among the"):
        SetSampler(store, config, rows=no_ctrl)


def _pairs_of(sampler) -> list[dict]:
    pairs = list(sampler)
    assert pairs
    return pairs


def test_rows_pickle_shard_and_resume():
    store = _store()
    rows = _rows_where(store, lambda lab: lab[2] != "b2" or lab[1] == "g1")
    config = SetSamplerConfig(set_size=SET_SIZE, tail="partial")
    sampler = SetSampler(store, config, rows=rows)
    copy = pickle.loads(pickle.dumps(sampler))
    assert _signature(copy) == _signature(sampler)
    per_rank = []
    for rank in range(2):
        shard = SetSampler(store, config, rank=rank, world_size=2, num_workers=2, rows=rows)
        per_rank.append([int(p["set_id"]) for p in shard.loader()])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(sampler.n_sets))
    full = [int(p["set_id"]) for p in SetSampler(store, config, rows=rows).loader()]
    resumed = SetSampler(store, config, rows=rows)
    loader = resumed.loader()
    head = [int(p["set_id"]) for _, p in zip(range(3), loader, strict=False)]
    state = loader.state_dict()
    again = SetSampler(store, config, rows=rows).loader()
    again.load_state_dict(state)
    assert head + [int(p["set_id"]) for p in again] == full
    other = SetSampler(store, config, rows=rows[1:]).loader()
    with pytest.raises(ValueError, match="row_subset"):
        other.load_state_dict(state)


def test_rows_are_validated():
    store = _store()
    config = SetSamplerConfig(set_size=SET_SIZE)
    with pytest.raises(ValueError, match=r"\[0, 202\)"):
        SetSampler(store, config, rows=np.array([0, 202]))
    with pytest.raises(TypeError, match="integer row ids"):
        SetSampler(store, config, rows=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="boolean rows mask"):
        SetSampler(store, config, rows=np.ones(5, dtype=bool))
    empty = SetSampler(store, config, rows=np.array([], dtype=np.int64))
    assert empty.n_sets == 0 and list(empty) == []
