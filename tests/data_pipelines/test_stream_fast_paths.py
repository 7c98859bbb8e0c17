"""The loader's fast paths change how cells are read, never which cells come out.

Real Zarr and WebDataset stores built from one synthetic h5ad; each fast path (parallel pool
builders, whole-unit pool reads, zero-copy batch slices, int32 torch CSR, packed worker
items) is compared with the plain path on the same store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from latentcell.data_pipelines import cell_stream as cs
from latentcell.data_pipelines.batches import csr_to_torch, to_dense
from latentcell.data_pipelines.blocks import CellBlock, csr_row_slice
from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize
from latentcell.data_pipelines.worker_transfer import PACKED_KEY, SHARED_FROM_BYTES, pack, unpack

pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """1,531 cells (prime) in 100-cell Zarr chunks and 230-cell WebDataset shards of 50-cell
    samples."""
    root = tmp_path_factory.mktemp("fast_paths")
    h5ad = root / "cells.h5ad"
    synthesize(SynthConfig(n_cells=1531, n_genes=150, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=4), h5ad)  # fmt: skip
    out = {
        "zarr": root / "cells.zarr",
        "webdataset": root / "cells.wds",
    }
    build_store([h5ad], out["zarr"], format="zarr", schema="vcc", chunk_cells=100)
    build_store([h5ad], out["webdataset"], format="webdataset", schema="vcc",
                cells_per_shard=230, block_cells=50)  # fmt: skip
    return out


def _epoch(path, **config) -> list[dict]:
    cfg = CellStreamConfig(**{"batch_size": 64, "buffer_units": 3, "seed": 3, **config})
    stream = CellStream(partial(open_store, path), cfg, num_workers=config.pop("workers", 0))
    stream.set_epoch(2)
    return list(stream.loader())


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["row"], y["row"]) and torch.equal(x["is_pad"], y["is_pad"])
        assert torch.equal(to_dense(x), to_dense(y))
        assert torch.equal(x["library_size"], y["library_size"])
        assert x["obs"].keys() == y["obs"].keys()
        for k in x["obs"]:
            assert torch.equal(x["obs"][k], y["obs"][k])


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_builder_threads_do_not_change_the_stream(stores, fmt):
    one = _epoch(stores[fmt], build_threads=1)
    assert sorted(torch.cat([b["row"][~b["is_pad"]] for b in one]).tolist()) == list(range(1531))
    for threads in (2, 3):
        _same(one, _epoch(stores[fmt], build_threads=threads))


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_resume_with_parallel_builders(stores, fmt):
    """A resume lands mid-epoch on a pool that was never asked for in order."""
    whole = _epoch(stores[fmt], build_threads=2)
    cfg = CellStreamConfig(batch_size=64, buffer_units=3, seed=3, build_threads=2)
    stream = CellStream(partial(open_store, stores[fmt]), cfg)
    stream.resume(2, 7)
    _same(whole[7:], list(stream.loader()))


def test_whole_unit_reads_equal_unit_by_unit(stores):
    for name in ("zarr", "webdataset"):
        reader = open_store(stores[name])
        units = [5, 0, 3, 3]  # any order, repeats allowed
        joined = reader.read_units(units)
        want = CellBlock.concat([reader.read_unit(u) for u in units])
        assert joined.X.indices.dtype == np.int32 and joined.X.dtype == np.float32
        assert (joined.X != want.X).nnz == 0
        np.testing.assert_array_equal(joined.X.indptr, want.X.indptr)
        np.testing.assert_array_equal(joined.rows, want.rows)
        for k in want.codes:
            np.testing.assert_array_equal(joined.codes[k], want.codes[k])
    with pytest.raises(IndexError):
        open_store(stores["zarr"]).read_units([99])


def test_pools_are_read_in_one_call_whatever_their_bounds(stores, monkeypatch):
    """Pools cut units wherever the pool size and the slot bounds fall (1,531 cells in 100-cell
    chunks, 2 ranks): the Zarr reader still reads each pool's row ranges in one call."""
    calls = []
    reader_cls = type(open_store(stores["zarr"]))
    original = reader_cls.read_ranges
    monkeypatch.setattr(
        reader_cls, "read_ranges", lambda self, r: calls.append(list(r)) or original(self, r)
    )
    cfg = CellStreamConfig(batch_size=64, buffer_cells=250, seed=3, tail="partial")
    rows = []
    for rank in (0, 1):
        stream = CellStream(partial(open_store, stores["zarr"]), cfg, rank=rank, world_size=2)
        rows += [b["row"] for b in stream.loader()]
    assert sorted(torch.cat(rows).tolist()) == list(range(1531))
    assert calls and sum(b - a for r in calls for a, b in r) == 1531
    assert any(a % 100 or b % 100 for r in calls for a, b in r if b != 1531)  # cut chunks


def test_row_slices_are_views_with_the_sorted_flag_kept():
    X = sp.random(50, 30, density=0.3, format="csr", dtype=np.float32, random_state=1)
    X.has_sorted_indices = True
    part = csr_row_slice(X, 10, 20)
    assert np.shares_memory(part.data, X.data) and np.shares_memory(part.indices, X.indices)
    assert part.has_sorted_indices
    np.testing.assert_array_equal(part.toarray(), X.toarray()[10:20])
    np.testing.assert_array_equal(csr_row_slice(X, 45, 99).toarray(), X.toarray()[45:])  # clamped
    assert csr_row_slice(X, 60, 70).shape == (0, 30)


def test_torch_csr_keeps_int32_indices_and_sorts_unsorted_rows():
    X = sp.random(40, 25, density=0.3, format="csr", dtype=np.float32, random_state=2)
    t = csr_to_torch(X)
    assert t.crow_indices().dtype == torch.int32 and t.col_indices().dtype == torch.int32
    np.testing.assert_array_equal(t.to_dense().numpy(), X.toarray())
    shuffled = X.copy()
    for r in range(shuffled.shape[0]):  # reverse each row's entries
        a, b = shuffled.indptr[r], shuffled.indptr[r + 1]
        shuffled.indices[a:b] = shuffled.indices[a:b][::-1].copy()
        shuffled.data[a:b] = shuffled.data[a:b][::-1].copy()
    shuffled.has_sorted_indices = False
    u = csr_to_torch(shuffled)
    assert (u.col_indices()[1:] > u.col_indices()[:-1])[
        u.crow_indices()[1:-1].long() - 1
    ].numel() >= 0
    np.testing.assert_array_equal(u.to_dense().numpy(), X.toarray())


@pytest.mark.parametrize("dense", [False, True])
def test_packed_items_round_trip(dense):
    X = sp.random(256, 3000 if dense else 40, density=0.2, format="csr", dtype=np.float32,
                  random_state=3)  # fmt: skip
    item = {
        "X": torch.from_numpy(X.toarray()) if dense else csr_to_torch(X),
        "obs": {"a": torch.arange(256), "empty": torch.zeros(0, dtype=torch.int64)},
        "is_pad": torch.zeros(256, dtype=torch.bool),
        "scalar": torch.tensor(3.5),
        "label": "g1",
        "levels": [torch.ones(2), 7],
        "_skipped_units": {"file": "crc32c"},
    }
    packed = pack(item)
    buffer = packed[PACKED_KEY][0]
    assert isinstance(buffer, torch.Tensor) == (buffer.nbytes >= SHARED_FROM_BYTES)
    back = unpack(packed)
    assert torch.equal(to_dense(back["X"]), to_dense(item["X"]))
    assert back["X"].layout == item["X"].layout
    for key in ("is_pad", "scalar"):
        assert torch.equal(back[key], item[key]) and back[key].dtype == item[key].dtype
    assert torch.equal(back["obs"]["a"], item["obs"]["a"]) and back["obs"]["empty"].shape == (0,)
    assert back["label"] == "g1" and back["levels"][1] == 7
    assert back["_skipped_units"] == {"file": "crc32c"}


@pytest.mark.parametrize("output", ["csr", "dense"])
def test_workers_deliver_what_the_main_process_reads(stores, output):
    """Worker items cross packed (``worker_transfer``) and arrive as the in-process ones."""
    cfg = dict(batch_size=64, buffer_units=3, seed=3, output=output, tail="partial")
    stream = CellStream(partial(open_store, stores["zarr"]), CellStreamConfig(**cfg), num_workers=2)
    stream.set_epoch(1)
    got = list(stream.loader())
    assert stream.pack_in_workers is False  # only while the workers start
    rows = torch.cat([b["row"] for b in got])
    assert sorted(rows.tolist()) == list(range(1531))
    reader = open_store(stores["zarr"])
    for batch in got[:3]:
        want = reader.read_rows(0, 1531).X[batch["row"].numpy()].toarray()
        np.testing.assert_array_equal(to_dense(batch).numpy(), want)


def test_a_plain_dataloader_gets_plain_tensors(stores):
    stream = CellStream(partial(open_store, stores["zarr"]), CellStreamConfig(batch_size=64),
                        num_workers=1)  # fmt: skip
    batch = next(iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)))
    assert PACKED_KEY not in batch and batch["X"].layout == torch.sparse_csr


def test_allocator_tuning_is_opt_out():
    code = ("from latentcell.data_pipelines.allocator import keep_freed_memory as k; "
            "print(k(), k())")  # fmt: skip
    env = {**os.environ, "LATENTCELL_KEEP_FREED_MEMORY": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert off.stdout.split() == ["False", "False"], off.stderr
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert on.returncode == 0 and on.stdout.split()[0] == on.stdout.split()[1]
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert on.stdout.split() == ["True", "True"]


def test_shared_units_read_once_across_threads():
    reads = []

    def read(k):
        reads.append(k)
        return k * 10

    shared = cs._SharedUnits(read, keep=2)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(shared.get, [1, 1, 1, 1, 2, 2])) == [10, 10, 10, 10, 20, 20]
    assert sorted(reads) == [1, 2]

    def broken(k):
        raise OSError("disk")

    failing = cs._SharedUnits(broken, keep=2)
    for _ in range(2):  # every caller sees the read's error
        with pytest.raises(OSError, match="disk"):
            failing.get(0)


def test_a_row_subset_reads_pools_in_one_call_with_the_same_cells(stores, monkeypatch):
    """A train split (``RowSubset``) over the Zarr store: pools come through the base's
    ``read_ranges`` in one call, and the stream equals the unit-by-unit path."""
    from latentcell.data_pipelines.row_subset import RowSubset

    rows = np.flatnonzero(np.random.default_rng(5).random(1531) < 0.7)
    cfg = CellStreamConfig(batch_size=64, buffer_units=3, seed=3)

    def epoch(source) -> list[dict]:
        stream = CellStream(source, cfg)
        stream.set_epoch(2)
        return list(stream.loader())

    fast = RowSubset(open_store(stores["zarr"]), rows)
    assert hasattr(fast, "read_ranges")
    slow = RowSubset(open_store(stores["zarr"]), rows)
    del slow.read_ranges  # as a base without read_ranges: unit by unit
    got, want = epoch(fast), epoch(slow)
    _same(got, want)
    seen = torch.cat([b["row"][~b["is_pad"]] for b in got])
    assert sorted(seen.tolist()) == rows.tolist()
    block = fast.read_ranges([(0, 5), (5, 5), (100, 140)])
    np.testing.assert_array_equal(block.rows, np.concatenate([rows[0:5], rows[100:140]]))
