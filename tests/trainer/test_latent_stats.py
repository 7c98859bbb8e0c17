"""``training_stats`` and ``LibraryModel`` on a tiny hand-built store with known values.

A real Zarr count store (124 cells in 16-cell units, one count column holding each cell's
library size) is encoded into a real latent store with known latents; the statistics must
equal what numpy computes from the same arrays, and the library model must draw library
sizes and batches per group, falling back to the pooled distribution for small or unseen
groups and null codes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.blocks import CellBlock, StoreSpec
from latentcell.data_pipelines.latent_store import LatentStoreReader, write_latent_store
from latentcell.data_pipelines.stores import make_writer, open_store
from latentcell.trainer.latent_stats import RIDGE, LibraryModel, training_stats

CELL_TYPES = ["A", "B", "C", "D"]  # D has no cells, C fewer than LibraryModel's min_cells
TREATMENTS = ["ctrl", "drug"]
BATCHES = ["b0", "b1", "b2"]
SIZES = {"A": 60, "B": 60, "C": 4}
LOG_LIBRARY = {"A": (np.log(2000.0), 0.1), "B": (np.log(50.0), 0.3), "C": (np.log(7.0), 0.0)}


def _cells(seed: int = 0) -> dict:
    """Cells sorted by cell type (later units hold later groups), with known obs values."""
    rng = np.random.default_rng(seed)
    cell_type = np.repeat(np.arange(3), list(SIZES.values())).astype(np.int32)
    n = len(cell_type)
    batch = np.select(
        [cell_type == 0, cell_type == 1], [0, rng.choice([1, 2], n, p=[0.25, 0.75])], 2
    ).astype(np.int32)
    mean, std = (np.array([LOG_LIBRARY[CELL_TYPES[c]][i] for c in cell_type]) for i in (0, 1))
    time = rng.uniform(0, 10, n)
    time[::7] = np.nan  # missing values do not count
    return {
        "cell_type": cell_type,
        "treatment": rng.integers(0, 2, n).astype(np.int32),
        "batch": batch,
        "library": np.maximum(np.round(np.exp(rng.normal(mean, std))), 1.0).astype(np.float32),
        "time": time,
        "z": (rng.normal(size=(n, 3)) * [1.0, 3.0, 0.5] + [5.0, -2.0, 0.0]).astype(np.float32),
    }


def _write_stores(cells: dict, root) -> LatentStoreReader:
    """A count store whose gene g0 holds the library size, then its latents ``cells['z']``."""
    n = len(cells["library"])
    var = pd.DataFrame(
        {"gene_id": ["g0", "g1"], "gene_symbol": ["G0", "G1"]},
        index=pd.Index(["g0", "g1"], name="gene_key"),
    )
    spec = StoreSpec(
        var=var,
        categories={"cell_type": CELL_TYPES, "treatment": TREATMENTS, "batch": BATCHES},
        numeric_dtypes={"time": "float64"},
        roles={"cell_type": "cell_type", "perturbation": "treatment", "batch": "batch"},
        control_label="ctrl",
        inputs=[],
        build_options={},
    )
    X = sp.csr_matrix(np.stack([cells["library"], np.zeros(n, np.float32)], axis=1))
    block = CellBlock(
        X=X,
        rows=np.full(n, -1, np.int64),
        library_size=cells["library"],
        codes={c: cells[c] for c in ("cell_type", "treatment", "batch")},
        numeric={"time": cells["time"]},
        names=np.array([f"cell-{i}" for i in range(n)]),
    )
    with make_writer("zarr", root / "counts", spec, chunk_cells=16) as writer:
        writer.append(block)
        counts = writer.finish()
    latents = write_latent_store(
        open_store(counts), lambda b: cells["z"][b.rows], root / "latents", n_latent=3
    )
    return LatentStoreReader(latents)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cells = _cells()
    reader = _write_stores(cells, tmp_path_factory.mktemp("stats"))
    assert len(reader.meta.unit_sizes) == 8  # the statistics are accumulated unit by unit
    return cells, reader


def _group_stats(log_library: np.ndarray, batch: np.ndarray) -> dict:
    """What ``training_stats`` reports for a set of cells (the pooled entry has no n_cells)."""
    return {
        "log_mean": pytest.approx(log_library.mean(), rel=1e-9),
        "log_std": pytest.approx(log_library.std(), rel=1e-6, abs=1e-9),
        "batch_counts": np.bincount(batch, minlength=len(BATCHES)).tolist(),
    }


def test_stats_equal_numpy(store):
    cells, reader = store
    stats = training_stats(reader, ["cell_type", "treatment"], ["time"], "batch")

    z = cells["z"].astype(np.float64)
    assert stats["n_cells"] == len(z)
    np.testing.assert_allclose(stats["latent_shift"], z.mean(axis=0), rtol=1e-9)
    assert stats["latent_scale"] == pytest.approx(1.0 / np.std(z - z.mean(axis=0)), rel=1e-9)
    time = cells["time"][np.isfinite(cells["time"])]
    assert stats["continuous"]["time"] == {
        "mean": pytest.approx(time.mean(), rel=1e-9),
        "std": pytest.approx(time.std(), rel=1e-9),
    }

    library = stats["library"]
    assert library["columns"] == ["cell_type", "treatment"]
    assert library["batch_column"] == "batch" and library["batch_labels"] == BATCHES
    log_library = np.log(cells["library"]).astype(np.float64)  # float32 log, as stored
    pooled = _group_stats(log_library, cells["batch"])
    pooled["latent_fit"] = _ridge_fit(cells["z"], log_library)
    assert library["global"] == pooled
    expected = []
    for ct in range(len(CELL_TYPES)):
        for tr in range(len(TREATMENTS)):
            rows = (cells["cell_type"] == ct) & (cells["treatment"] == tr)
            if rows.any():  # a combination without cells has no entry
                group = _group_stats(log_library[rows], cells["batch"][rows])
                group["latent_fit"] = _ridge_fit(cells["z"][rows], log_library[rows])
                labels = [CELL_TYPES[ct], TREATMENTS[tr]]
                expected.append(
                    {"codes": [ct, tr], "labels": labels, "n_cells": int(rows.sum()), **group}
                )
    assert library["groups"] == expected
    assert {g["labels"][0] for g in library["groups"]} == {"A", "B", "C"}


def test_stats_without_conditions_or_batch(store):
    cells, reader = store
    library = training_stats(reader, [], [], None)["library"]
    log_library = np.log(cells["library"]).astype(np.float64)  # float32 log, as stored
    assert library["batch_labels"] == [] and library["global"]["batch_counts"] == [len(log_library)]
    assert len(library["groups"]) == 1 and library["groups"][0]["codes"] == []
    assert library["groups"][0]["log_mean"] == pytest.approx(log_library.mean(), rel=1e-9)


def _ridge_fit(z: np.ndarray, y: np.ndarray):
    """The latent fit ``training_stats`` must report: ridge (no penalty on the intercept), or
    None below 5 cells per coefficient."""
    x = np.concatenate([np.ones((len(z), 1)), z.astype(np.float64)], axis=1)
    if len(y) < 5 * x.shape[1]:
        return None
    penalty = np.eye(x.shape[1]) * RIDGE
    penalty[0, 0] = 0.0
    beta = np.linalg.solve(x.T @ x + penalty, x.T @ y)
    residual = y - x @ beta
    return {
        "intercept": pytest.approx(beta[0], rel=1e-6, abs=1e-9),
        "coef": pytest.approx(beta[1:], rel=1e-6, abs=1e-9),
        "residual_std": pytest.approx(
            np.sqrt(residual @ residual / (len(y) - x.shape[1])), rel=1e-5
        ),
    }


def _draw(model: LibraryModel, cell_type: int | np.ndarray, n: int = 4000, seed: int = 0):
    codes = np.broadcast_to(np.asarray(cell_type).reshape(-1, 1), (n, 1))
    return model.sample(codes, np.random.default_rng(seed))


def _fractions(batch: np.ndarray) -> np.ndarray:
    return np.bincount(batch, minlength=len(BATCHES)) / len(batch)


def test_library_model_samples_each_group(store):
    _, reader = store
    stats = training_stats(reader, ["cell_type"], [], "batch")["library"]
    model = LibraryModel(stats)
    group = {g["labels"][0]: g for g in stats["groups"]}
    for label, code in (("A", 0), ("B", 1)):
        library, batch = _draw(model, code)
        assert library.dtype == np.float32 and (library >= 1).all()
        assert np.array_equal(library, np.round(library))
        assert np.log(library).mean() == pytest.approx(group[label]["log_mean"], abs=0.03)
        assert np.log(library).std() == pytest.approx(group[label]["log_std"], abs=0.03)
        counts = np.asarray(group[label]["batch_counts"])
        assert set(np.unique(batch)) == set(np.flatnonzero(counts))  # only batches it was seen in
        np.testing.assert_allclose(_fractions(batch), counts / counts.sum(), atol=0.03)

    # rows of different groups in one call each follow their own group
    library, batch = _draw(model, np.tile([0, 1], 2000))
    assert (batch[0::2] == 0).all() and (batch[1::2] > 0).all()
    assert np.median(library[0::2]) > 10 * np.median(library[1::2])

    # same seed, same draws
    (lib_a, batch_a), (lib_b, batch_b) = _draw(model, 1), _draw(model, 1)
    assert np.array_equal(lib_a, lib_b) and np.array_equal(batch_a, batch_b)
    assert not np.array_equal(_draw(model, 1)[0], _draw(model, 1, seed=1)[0])


@pytest.mark.parametrize("code", [2, 3, -1], ids=["below-min-cells", "unseen", "null"])
def test_library_model_falls_back_to_the_pooled_distribution(store, code):
    _, reader = store
    stats = training_stats(reader, ["cell_type"], [], "batch")["library"]
    pooled = stats["global"]
    library, batch = _draw(LibraryModel(stats), code)
    assert np.log(library).mean() == pytest.approx(pooled["log_mean"], abs=0.05)
    assert np.log(library).std() == pytest.approx(pooled["log_std"], abs=0.05)
    counts = np.asarray(pooled["batch_counts"])
    np.testing.assert_allclose(_fractions(batch), counts / counts.sum(), atol=0.03)


def test_min_cells_decides_which_groups_are_kept(store):
    _, reader = store
    stats = training_stats(reader, ["cell_type"], [], "batch")["library"]
    library, batch = _draw(LibraryModel(stats, min_cells=1), 2, n=50)
    assert (library == 7).all() and (batch == 2).all()  # C: every cell had 7 counts, batch b2
    assert set(LibraryModel(stats, min_cells=61).groups) == set()


def test_stats_with_missing_condition_labels(tmp_path):
    cells = _cells(seed=1)
    cells["cell_type"][:3] = -1  # a store may hold missing labels (code -1)
    reader = _write_stores(cells, tmp_path)
    library = training_stats(reader, ["cell_type"], [], "batch")["library"]
    assert sum(g["n_cells"] for g in library["groups"]) == 121  # labelled cells only
    assert sum(library["global"]["batch_counts"]) == 124


def _latent_linked_store(root):
    """Cells whose log library is 6 + 0.5 z0 - 0.3 z2 + N(0, 0.1): the state sets the depth."""
    cells = _cells(seed=2)
    rng = np.random.default_rng(3)
    n = len(cells["library"])
    z = rng.normal(size=(n, 3)).astype(np.float32)
    log_lib = 6.0 + 0.5 * z[:, 0] - 0.3 * z[:, 2] + rng.normal(scale=0.1, size=n)
    cells["z"], cells["library"] = z, np.round(np.exp(log_lib)).astype(np.float32)
    return cells, _write_stores(cells, root)


def test_latent_fit_recovers_the_library_dependence_and_drives_the_draws(tmp_path):
    cells, reader = _latent_linked_store(tmp_path)
    library = training_stats(reader, ["cell_type"], [], "batch")["library"]
    fit = {g["labels"][0]: g["latent_fit"] for g in library["groups"]}
    assert fit["C"] is None  # 4 cells: fewer than 5 per coefficient
    for label in ("A", "B"):
        assert fit[label]["intercept"] == pytest.approx(6.0, abs=0.05)
        np.testing.assert_allclose(fit[label]["coef"], [0.5, 0.0, -0.3], atol=0.05)
        assert fit[label]["residual_std"] == pytest.approx(0.1, abs=0.03)

    z = np.random.default_rng(4).normal(size=(4000, 3))
    codes = np.zeros((4000, 1), dtype=np.int64)  # cell type A
    linked, _ = LibraryModel(library).sample(codes, np.random.default_rng(0), z)
    plain, _ = LibraryModel(library, mode="condition").sample(codes, np.random.default_rng(0), z)
    expected = 6.0 + 0.5 * z[:, 0] - 0.3 * z[:, 2]
    assert np.corrcoef(np.log(linked), expected)[0, 1] > 0.95
    assert np.std(np.log(linked) - expected) == pytest.approx(0.1, abs=0.02)
    assert abs(np.corrcoef(np.log(plain), expected)[0, 1]) < 0.1  # condition mode ignores z
    a = {g["labels"][0]: g for g in library["groups"]}["A"]
    assert np.log(plain).std() == pytest.approx(a["log_std"], abs=0.03)

    # a latent far outside the training range asks for a depth within mean +- 3 sd
    far, _ = LibraryModel(library).sample(codes[:1], np.random.default_rng(0), np.full((1, 3), 1e3))
    assert np.log(far[0]) <= a["log_mean"] + 3 * a["log_std"] + 0.5
    # no latents given (or a group without a fit): the plain log-normal
    none, _ = LibraryModel(library).sample(codes, np.random.default_rng(0))
    assert np.array_equal(none, plain)
    with pytest.raises(ValueError, match="library mode"):
        LibraryModel(library, mode="depth")


def test_statistics_without_latent_fits_still_load(store):
    """latent_stats.json written before the fits existed: every group draws its log-normal."""
    _, reader = store
    library = training_stats(reader, ["cell_type"], [], "batch")["library"]
    for g in (library["global"], *library["groups"]):
        del g["latent_fit"]
    z = np.zeros((4000, 3))
    linked, _ = LibraryModel(library).sample(
        np.zeros((4000, 1), np.int64), np.random.default_rng(0), z
    )
    assert np.log(linked).mean() == pytest.approx(library["groups"][0]["log_mean"], abs=0.03)
