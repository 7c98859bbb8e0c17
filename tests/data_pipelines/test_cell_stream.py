"""CellStream semantics over a real reader: coverage per tail, determinism, resume, content.

Sizes are chosen so nothing divides evenly: 1031 cells (prime), units of 47, pools of 3 units.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from latentcell.data_pipelines.batches import batch_len, to_dense
from latentcell.data_pipelines.cell_stream import (
    CellStream,
    CellStreamConfig,
    resolve_rank_world,
    round_robin_resume,
)
from latentcell.data_pipelines.memory_source import InMemoryStore

N_CELLS, N_GENES = 1031, 23

# torch warns that sparse CSR is beta when a worker's batch is rebuilt; batches.py silences it,
# but pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")


@pytest.fixture(scope="module")
def store() -> InMemoryStore:
    rng = np.random.default_rng(0)
    X = sp.random(N_CELLS, N_GENES, density=0.25, format="csr", random_state=2, dtype=np.float32)
    X.data = np.ceil(X.data * 7)
    obs = pd.DataFrame(
        {
            "ct": rng.choice(["a", "b", "c"], N_CELLS),
            "pert": rng.choice(["ctrl", "g1"], N_CELLS),
            "donor": rng.choice(["d1", "d2"], N_CELLS),
            "depth": rng.random(N_CELLS),
        }
    )
    return InMemoryStore.from_obs(
        X,
        obs,
        roles={"cell_type": "ct", "perturbation": "pert"},
        control_label="ctrl",
        unit_cells=47,
    )


def _config(**kw) -> CellStreamConfig:
    return CellStreamConfig(**{"batch_size": 20, "buffer_units": 3, **kw})


def _rank_batches(store, config, rank, world, workers) -> list[dict]:
    stream = CellStream(store, config, rank=rank, world_size=world, num_workers=workers)
    batches = list(stream.loader())
    assert len(batches) == len(stream)
    return batches


def _rows(batches, real_only=True) -> np.ndarray:
    if not batches:
        return np.zeros(0, dtype=np.int64)
    keep = [b["row"][~b["is_pad"]] if real_only else b["row"] for b in batches]
    return torch.cat(keep).numpy()


@pytest.mark.parametrize("tail", ["pad", "drop", "partial"])
def test_every_cell_once_two_ranks_two_workers(store, tail):
    config = _config(tail=tail)
    per_rank = [_rank_batches(store, config, r, 2, 2) for r in range(2)]
    rows = np.concatenate([_rows(b) for b in per_rank])
    assert len(np.unique(rows)) == len(rows)  # nothing twice
    counts = [len(b) for b in per_rank]
    sizes = [batch_len(b) for batches in per_rank for b in batches]
    if tail == "partial":
        assert sorted(rows) == list(range(N_CELLS))
    if tail == "pad":
        assert sorted(rows) == list(range(N_CELLS))
        assert counts[0] == counts[1] and set(sizes) == {20}
        for batches in per_rank:  # pad cells repeat the rank's own cells
            assert set(_rows(batches, real_only=False)) == set(_rows(batches))
    if tail == "drop":
        assert counts[0] == counts[1] and set(sizes) == {20}
        assert N_CELLS - len(rows) < 4 * 20
        assert not any(b["is_pad"].any() for batches in per_rank for b in batches)


def test_rank_cells_do_not_depend_on_workers(store):
    config = _config(tail="partial")
    for rank in range(2):
        rows0 = _rows(_rank_batches(store, config, rank, 2, 0))
        rows2 = _rows(_rank_batches(store, config, rank, 2, 2))
        assert sorted(rows0) == sorted(rows2)
        # the rank's share of the epoch's virtual sequence (units in permuted order)
        order = CellStream(store, config).unit_order()
        starts = store.unit_starts
        sequence = np.concatenate([np.arange(starts[u], starts[u + 1]) for u in order])
        share = sequence[rank * N_CELLS // 2 : (rank + 1) * N_CELLS // 2]
        assert sorted(rows0) == sorted(share)


def test_determinism_and_epochs(store):
    config = _config(tail="partial")
    first = [b["row"] for b in CellStream(store, config)]
    again = [b["row"] for b in CellStream(store, config)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    stream = CellStream(store, config)
    stream.set_epoch(1)
    other = torch.cat([b["row"] for b in stream])
    assert not torch.equal(torch.cat(first), other)
    assert sorted(other.tolist()) == list(range(N_CELLS))
    reseeded = torch.cat([b["row"] for b in CellStream(store, _config(tail="partial", seed=5))])
    assert not torch.equal(torch.cat(first), reseeded)


@pytest.mark.parametrize(("workers", "tail"), [(0, "partial"), (2, "partial"), (2, "pad")])
def test_resume_is_exact(store, workers, tail):
    # batch 103 over slots of 515/516 cells: workers yield 5 and 6 batches (uneven round robin)
    config = _config(tail=tail, batch_size=103, buffer_cells=150)
    epoch = 3

    def run(consumed: int | None) -> list[tuple[list, list]]:
        stream = CellStream(store, config, rank=0, world_size=1, num_workers=workers)
        if consumed is None:
            stream.set_epoch(epoch)
        else:
            stream.resume(epoch, consumed)
            stream.set_epoch(epoch)  # the usual loop calls set_epoch; the resume survives
        return [(b["row"].tolist(), b["is_pad"].tolist()) for b in stream.loader()]

    full = run(None)
    assert len(full) == len(CellStream(store, config, world_size=1, num_workers=workers))
    for consumed in (1, 4, 5, len(full) - 1, len(full)):
        assert full[:consumed] + run(consumed) == full, consumed


def test_resume_through_state_dict(store):
    config = _config(tail="pad")
    make = lambda: CellStream(store, config, rank=1, world_size=2, num_workers=2)  # noqa: E731
    full = [b["row"].tolist() for b in make().loader()]
    loader = make().loader()
    head = [b["row"].tolist() for b in itertools.islice(loader, 7)]
    state = loader.state_dict()
    assert state["batches_consumed"] == 7
    fresh = make().loader()
    fresh.load_state_dict(state)
    assert head + [b["row"].tolist() for b in fresh] == full
    other = CellStream(store, _config(tail="pad", batch_size=21), rank=1, world_size=2)
    with pytest.raises(ValueError, match="layout differs"):
        other.load_state_dict(state)


def test_round_robin_resume_matches_simulation():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 6, size=rng.integers(1, 5))
        order = [(t, w) for t in range(6) for w in range(len(counts)) if t < counts[w]]
        for consumed in range(len(order) + 1):
            offsets, first = round_robin_resume(counts, consumed)
            expected = np.bincount([w for _, w in order[:consumed]], minlength=len(counts))
            np.testing.assert_array_equal(offsets, expected)
            if consumed < len(order):
                assert first == order[consumed][1]


def test_shuffle_quality(store):
    def adjacent_fraction(stream) -> float:
        rows = [b["row"].numpy() for b in stream]
        return float(np.mean(np.concatenate([np.abs(np.diff(r)) == 1 for r in rows])))

    assert adjacent_fraction(CellStream(store, _config(tail="partial"))) < 0.1
    assert adjacent_fraction(CellStream(store, _config(tail="partial", shuffle=False))) > 0.9


def test_unshuffled_is_row_order(store):
    rows = _rows(list(CellStream(store, _config(tail="partial", shuffle=False))))
    np.testing.assert_array_equal(rows, np.arange(N_CELLS))


def test_content_dense_equals_csr_equals_store(store):
    csr = list(CellStream(store, _config(columns=("donor",), numeric_columns=("depth",))))
    dense = list(CellStream(store, _config(output="dense", columns=("donor",))))
    X = store.X.toarray()
    for c, d in zip(csr, dense, strict=True):
        assert c["X"].layout == torch.sparse_csr and d["X"].layout == torch.strided
        assert torch.equal(to_dense(c), d["X"]) and d["X"].dtype == torch.float32
        rows = c["row"].numpy()
        np.testing.assert_array_equal(d["X"].numpy(), X[rows])
        np.testing.assert_allclose(c["library_size"].numpy(), X[rows].sum(axis=1))
        assert set(c["obs"]) == {"donor", "cell_type", "perturbation"}
        np.testing.assert_array_equal(c["obs"]["cell_type"].numpy(), store.codes["ct"][rows])
        assert c["obs"]["donor"].dtype == torch.int64 and c["row"].dtype == torch.int64
        np.testing.assert_allclose(c["numeric"]["depth"].numpy(), store.numeric["depth"][rows])


def test_layout_errors(store):
    tiny = InMemoryStore(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)), unit_cells=2)
    with pytest.raises(ValueError, match="at least one cell per slot"):
        CellStream(tiny, _config(), world_size=2, rank=0, num_workers=2)
    partial = _config(tail="partial")  # 3 cells over 4 slots: rank 0 gets 0 + 1, rank 1 1 + 1
    assert len(CellStream(tiny, partial, world_size=2, rank=0, num_workers=2)) == 1
    assert len(CellStream(tiny, partial, world_size=2, rank=1, num_workers=2)) == 2
    stream = CellStream(store, _config(), num_workers=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(loader))
    with pytest.raises(ValueError, match="columns"):
        CellStream(store, _config(columns=("nope",)))


def test_rank_world_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank_world(None, None) == (1, 3)
    assert resolve_rank_world(0, None) == (0, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_rank_world(None, None) == (0, 1)


def test_factory_source_and_csr_through_workers(store):
    stream = CellStream(lambda: store, _config(tail="partial"), num_workers=2)
    batches = list(stream.loader())
    assert sorted(_rows(batches)) == list(range(N_CELLS))
    X = store.X.toarray()
    for batch in batches:  # sparse CSR tensors survive worker pickling intact
        assert batch["X"].layout == torch.sparse_csr
        np.testing.assert_array_equal(to_dense(batch).numpy(), X[batch["row"].numpy()])


def test_pad_wraps_around_small_slots():
    X = sp.csr_matrix(np.arange(1, 15, dtype=np.float32).reshape(7, 2))
    tiny = InMemoryStore(X, unit_cells=2)
    config = _config(batch_size=8, buffer_cells=2)  # slots of 3 and 4 cells, pools of 2
    for rank, n_real in ((0, 3), (1, 4)):
        (batch,) = list(CellStream(tiny, config, rank=rank, world_size=2))
        rows, pad = batch["row"].numpy(), batch["is_pad"].numpy()
        assert pad.tolist() == [False] * n_real + [True] * (8 - n_real)
        np.testing.assert_array_equal(rows[n_real:], np.resize(rows[:n_real], 8 - n_real))
        np.testing.assert_array_equal(to_dense(batch).numpy(), X.toarray()[rows])
