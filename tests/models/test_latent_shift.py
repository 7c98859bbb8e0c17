"""The latent-shift predictor protocol and its reference MLP, on toy embeddings with a known
answer: the MLP learns a linear shift; its state round-trips exactly through .npz without
pickle; descriptors add genes; a bad plug-in is one error naming model.predictor."""

from __future__ import annotations

import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.latent_shift import (
    ConditionalMLP,
    Descriptors,
    PCAEmbedding,
    PerturbationPredictor,
    make_predictor,
)


def toy(n: int, seed: int):
    """Controls in 8 dims; 4 perturbations, each a fixed offset plus a linear map of the
    control (the response depends on the cell): pert = ctrl + B[p] + ctrl @ A."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(99)
    offsets, a = truth.normal(size=(4, 8)) * 2, truth.normal(size=(8, 8)) * 0.3
    ctrl = rng.normal(size=(n, 8)).astype(np.float32)
    cov = np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)]
    return ctrl, (ctrl + cov @ offsets + ctrl @ a).astype(np.float32), cov


def test_the_mlp_learns_a_known_linear_shift():
    ctrl, pert, cov = toy(2000, seed=0)
    mlp = ConditionalMLP()
    assert isinstance(mlp, PerturbationPredictor)
    mlp.train(ctrl, pert, cov, seed=0, max_steps=600, lr=3e-3)
    test_ctrl, test_pert, test_cov = toy(500, seed=1)  # new cells
    error = ((mlp.predict(test_ctrl, test_cov) - test_pert) ** 2).mean()
    no_effect = ((test_ctrl - test_pert) ** 2).mean()
    assert error < 0.02 * no_effect, (error, no_effect)


def test_state_round_trips_through_npz_without_pickle(tmp_path):
    ctrl, pert, cov = toy(300, seed=0)
    mlp = ConditionalMLP()
    mlp.train(ctrl, pert, cov, seed=3, max_steps=50, hidden=(16, 8))
    np.savez(tmp_path / "state.npz", **mlp.get_state())
    fresh = ConditionalMLP()
    with np.load(tmp_path / "state.npz", allow_pickle=False) as f:
        fresh.set_state({k: f[k] for k in f.files})
    np.testing.assert_array_equal(fresh.predict(ctrl, cov), mlp.predict(ctrl, cov))
    again = ConditionalMLP()  # seeded: the same training gives the same model
    again.train(ctrl, pert, cov, seed=3, max_steps=50, hidden=(16, 8))
    np.testing.assert_array_equal(again.predict(ctrl, cov), mlp.predict(ctrl, cov))


def test_descriptors_sum_gene_vectors_and_the_control_is_zero():
    labels = ["non-targeting", "A", "B", "A+B"]
    table = Descriptors.build("gene_table", labels, "non-targeting")
    m = table.matrix(["A", "B", "A+B", "non-targeting"])
    np.testing.assert_array_equal(m[2], m[0] + m[1])
    assert not m[3].any()
    onehot = Descriptors.build("onehot", labels, "non-targeting")
    assert onehot.matrix(["A+B"]).tolist() == [[0, 0, 1]]  # a combination is its own label
    with pytest.raises(DataValidationError, match="no entry for \\['C'\\]"):
        table.matrix(["A+C"])


def test_external_descriptors_read_the_st_file_formats(tmp_path):
    path = tmp_path / "vectors.npz"
    np.savez(path, genes=np.array(["A", "B", "Z"]), vectors=np.arange(6.0).reshape(3, 2))
    external = Descriptors.build("external", ["non-targeting", "A", "B"], "non-targeting", path)
    assert external.matrix(["A+B"]).tolist() == [[2.0, 4.0]]


def test_pca_shift_decoding_keeps_what_the_components_drop():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(200, 30))).astype(np.float32)
    pca = PCAEmbedding.fit(x, 5, seed=0)
    z = pca.encode(x)
    np.testing.assert_allclose(pca.decode(z, z, x, "shift"), x, atol=1e-5)  # no shift: x
    assert np.abs(pca.decode(z, z, x, "full") - x).mean() > 0.1  # the plain inverse loses some


class NoPredict:
    def train(self, *a, **k): ...


@pytest.mark.parametrize(
    "reference, problem",
    [
        ("no_such_module_xyz:Model", "cannot import module 'no_such_module_xyz'"),
        ("numpy", "is not a 'pkg.module:Class' reference"),
        ("numpy:NoSuchClass", "module 'numpy' has no attribute 'NoSuchClass'"),
        (f"{__name__}:NoPredict", "has no method predict, get_state, set_state"),
    ],
)
def test_a_bad_plugin_is_one_error_naming_model_predictor(reference, problem):
    with pytest.raises(DataValidationError) as err:
        make_predictor(reference)
    assert err.value.field == "model.predictor"
    assert problem in err.value.problem
    assert "\n" not in str(err.value)
