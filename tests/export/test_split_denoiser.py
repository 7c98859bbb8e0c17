"""The split denoiser (conditioning once per distinct condition, then the body) computes what
the whole denoiser graph computes, on one thread or several, and counts are drawn the same on
any number of threads."""

from __future__ import annotations

import numpy as np
import pytest

from latentcell.export.runtime import Bundle, OnnxGenerator
from latentcell.export.runtime.likelihoods import sample_counts
from latentcell.export.runtime.split_denoiser import GRAPHS, distinct_rows, split_denoiser


def _generators(path, threads=1):
    split = OnnxGenerator(Bundle.load(path, threads=threads))
    whole = OnnxGenerator(Bundle.load(path, threads=threads))
    for name in GRAPHS:  # as a bundle exported before the split graphs existed
        del whole.bundle.components[name]
    return split, whole


@pytest.mark.parametrize("name", ["dit", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("conditions", [{}, {"cell_type": "*"}])
def test_split_equals_whole_denoiser(bundles, name, guidance, conditions):
    split, whole = _generators(getattr(bundles, name))
    if conditions == {}:  # one shared condition: the broadcast body
        column = next(iter(split.space.categories))
        conditions = {column: split.space.categories[column][0]}
    rows = split.space.rows(20, conditions)  # "*": 20 of each cell type
    noise = np.random.default_rng(1).standard_normal((len(rows), split.n_latent))
    noise = noise.astype(np.float32)
    cond, null = split._conditions(rows)
    assert split_denoiser(split.bundle, cond, null, guidance, len(rows)) is not None
    got = split.sample_latents(rows, 8, guidance, noise=noise)
    want = whole.sample_latents(rows, 8, guidance, noise=noise)
    assert np.abs(want - noise).max() > 0.1  # the sampler moved
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_threads_change_nothing(bundles):
    one, _ = _generators(bundles.dit, threads=1)
    two, _ = _generators(bundles.dit, threads=2)
    a = one.generate(64, {"cell_type": "*"}, steps=6, seed=3)
    b = two.generate(64, {"cell_type": "*"}, steps=6, seed=3)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    # the same draws; a mean differing in its last bit may move a rare count by one
    assert (a.counts == b.counts).mean() > 0.999


def test_small_calls_use_the_whole_denoiser(bundles):
    split, _ = _generators(bundles.dit)
    rows = split.space.rows(8, {})
    cond, null = split._conditions(rows)
    assert split_denoiser(split.bundle, cond, null, 1.0, len(rows)) is None


def test_distinct_rows_treat_the_null_value_as_one_value():
    codes = np.array([[0, 1], [0, 1], [2, 1], [0, 1]], dtype=np.int64)
    values = np.array([[np.nan], [np.nan], [0.5], [np.nan]], dtype=np.float32)
    feeds, inverse = distinct_rows({"codes": codes, "values": values}, 4)
    assert len(feeds["codes"]) == 2 and inverse[0] == inverse[1] == inverse[3] != inverse[2]
    np.testing.assert_array_equal(feeds["codes"][inverse], codes)
    empty, zeros = distinct_rows({}, 3)
    assert empty == {} and zeros.tolist() == [0, 0, 0]


def test_counts_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(0)
    params = {"mu": rng.random((150, 30)).astype(np.float32) * 5,
              "theta": rng.random((150, 30)).astype(np.float32) + 0.2}  # fmt: skip
    library = np.full(150, 1e4, dtype=np.float32)
    one = sample_counts(params, library, np.random.default_rng(7), threads=1)
    two = sample_counts(params, library, np.random.default_rng(7), threads=2)
    np.testing.assert_array_equal(one, two)
    assert one.dtype == np.float32 and one.shape == (150, 30)
    mean = one.mean(0)  # NB mean is mu
    assert np.abs(mean - params["mu"].mean(0)).max() < 2.0
