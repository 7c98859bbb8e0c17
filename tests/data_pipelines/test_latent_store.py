"""The latent store written from the real small Zarr store with a known encoder (the first
three gene counts of each cell): exact round trip of latents and obs, the unit layout of
the count store, checksums that catch a tampered chunk, encoder failures that leave nothing
behind, and a two-rank ``CellStream`` of dense latents that covers every cell once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.blocks import CellBlock
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.latent_store import (
    LatentStoreReader,
    source_fingerprint,
    write_latent_store,
)
from latentcell.data_pipelines.stores import open_store, verify_store

N_LATENT = 3
PROVENANCE = {"encoder": "first three genes", "version": 1}


def first_genes(block: CellBlock) -> np.ndarray:
    """A known encoder: the counts of the first ``N_LATENT`` genes."""
    return block.X[:, :N_LATENT].toarray()


def write(source_path, out, encode=first_genes, **opts):
    return write_latent_store(open_store(source_path), encode, out, N_LATENT, PROVENANCE, **opts)


def leftovers(directory) -> list[str]:
    """Everything in ``directory`` (a failed build must leave no store and no temp dir)."""
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def latents(small_store, tmp_path_factory):
    # chunks of 250 cells do not line up with the source's 100-cell units
    return write(small_store, tmp_path_factory.mktemp("latent") / "latents", chunk_cells=250)


def test_round_trip_is_exact(small_store, latents):
    source = open_store(small_store)
    reader = open_store(latents)
    assert isinstance(reader, LatentStoreReader)
    meta, src = reader.meta, source.meta
    assert meta.format == "latent" and meta.n_cells == src.n_cells == 1200
    assert meta.n_genes == N_LATENT and list(meta.var.index) == ["z0", "z1", "z2"]
    np.testing.assert_array_equal(meta.unit_sizes, src.unit_sizes)
    assert meta.categories == src.categories and meta.roles == src.roles
    assert meta.numeric_columns == src.numeric_columns
    assert meta.control_label == src.control_label

    want, got = source.read_rows(0, src.n_cells), reader.read_rows(0, meta.n_cells)
    assert isinstance(got.X, np.ndarray) and got.X.dtype == np.float32
    np.testing.assert_array_equal(got.X, want.X[:, :N_LATENT].toarray())
    np.testing.assert_array_equal(got.library_size, want.library_size)
    np.testing.assert_array_equal(got.rows, np.arange(1200))
    assert got.codes.keys() == want.codes.keys() and got.numeric.keys() == want.numeric.keys()
    for col in want.codes:
        np.testing.assert_array_equal(got.codes[col], want.codes[col])
    for col in want.numeric:
        np.testing.assert_array_equal(got.numeric[col], want.numeric[col])
        assert got.numeric[col].dtype == want.numeric[col].dtype

    # a read unit is the count store's unit, with global row ids
    unit = reader.read_unit(7)
    np.testing.assert_array_equal(unit.rows, np.arange(700, 800))
    np.testing.assert_array_equal(unit.X, got.X[700:800])

    assert reader.provenance() == {
        "source": {
            "path": str(small_store.absolute()),
            "manifest_sha256": source_fingerprint(small_store),
            "n_genes": 200,
        },
        "encoder": PROVENANCE,
    }


def test_verify_store_detects_a_tampered_chunk(small_store, tmp_path):
    out = write(small_store, tmp_path / "latents")
    assert verify_store(out) == []
    chunk = next(p for p in sorted((out / "z").rglob("*")) if p.is_file() and p.parent.name != "z")
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = verify_store(out)
    assert len(problems) == 1 and problems[0].startswith("z: checksum mismatch")


@pytest.mark.parametrize(
    ("encode", "message"),
    [
        (lambda block: first_genes(block)[:, :2], r"encoder returned \(100, 2\)"),
        (lambda block: first_genes(block)[:-1], r"encoder returned \(99, 3\)"),
        (lambda block: np.where(block.rows[:, None] == 450, np.nan, first_genes(block)), "unit 4"),
    ],
    ids=["too-few-dims", "too-few-cells", "nan"],
)
def test_bad_encoder_raises_and_leaves_nothing(small_store, tmp_path, encode, message):
    with pytest.raises(ValueError, match=message):
        write(small_store, tmp_path / "latents", encode=encode)
    assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(small_store, latents, tmp_path):
    out = write(small_store, tmp_path / "latents")
    with pytest.raises(DataValidationError, match="already exists"):
        write(small_store, out)
    again = write(small_store, out, encode=lambda b: first_genes(b) + 1, overwrite=True)
    np.testing.assert_array_equal(
        open_store(again).read_rows(0, 5).X, open_store(latents).read_rows(0, 5).X + 1
    )
    assert leftovers(tmp_path) == ["latents"]


def test_two_rank_stream_covers_every_cell_once_per_epoch(latents):
    reader = LatentStoreReader(latents)
    z = reader.read_rows(0, reader.meta.n_cells).X
    config = CellStreamConfig(
        batch_size=64, output="dense", buffer_units=3, columns=("cell_type",), tail="pad"
    )
    for epoch in (0, 1):
        rows = []
        for rank in range(2):
            stream = CellStream(reader, config, rank=rank, world_size=2)
            stream.set_epoch(epoch)
            for batch in stream:
                assert batch["X"].layout == torch.strided and batch["X"].shape[1] == N_LATENT
                row = batch["row"].numpy()
                np.testing.assert_array_equal(batch["X"].numpy(), z[row])  # latents of its cells
                codes = reader.meta.categories["cell_type"]
                assert batch["obs"]["cell_type"].max() < len(codes)
                rows.append(row[~batch["is_pad"].numpy()])
        rows = np.concatenate(rows)
        assert np.array_equal(np.sort(rows), np.arange(1200)), f"epoch {epoch}"
