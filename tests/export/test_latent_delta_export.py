"""A latent-delta run exported to ONNX: the bundle's four graphs and its "latent_delta"
section, its predictions against torch's (the same noise: latents within float error), and
the runtime's ``predict --mode sampled|deterministic`` where importing torch fails."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from latentcell.export.onnx_io import TOLERANCE
from latentcell.export.runtime import Bundle
from latentcell.export.runtime.latent_delta_predict import OnnxLatentDeltaPredictor
from latentcell.inference.latent_delta_predictor import LatentDeltaPredictor
from latentcell.inference.predict import _dense, log1p_normalize
from tests.export.exported_runs import exported
from tests.latent_delta_runs import trained_latent_delta
from tests.no_torch import blocked_env, runtime


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_delta_export")
    return exported(trained_latent_delta(root, steps=60), root)


def test_the_bundle_holds_the_four_graphs_and_the_section(run):
    meta = run.meta
    assert meta["kind"] == "latent-delta"
    assert set(meta["components"]) == {"delta_predictor", "denoiser", "vae_encoder", "vae_decoder"}
    assert list(meta["components"]["delta_predictor"]["inputs"]) == ["z_control", "perturbation"]
    assert list(meta["components"]["denoiser"]["inputs"]) == ["x", "t", "codes", "values"]
    assert max(c["parity"]["max_rel_error"] for c in meta["components"].values()) < TOLERANCE
    section = meta["latent_delta"]
    card = json.loads((run.run / "final" / "model_config.json").read_text())
    assert section["labels"] == card["categories"]["perturbation"]
    assert (
        section["trained"] == card["trained_perturbations"]
        and run.held[0] not in section["trained"]
    )
    assert section["target"] == "delta" and len(section["control_mean"]) == 8
    assert section["null_code"] == len(section["labels"])
    assert len(section["diffusion"]["alphas_cumprod"]) == section["diffusion"]["n_train_steps"]


def _controls(run, n=40):
    test = run.test
    counts = _dense(test.X)
    control = (test.obs["target_gene"] == "non-targeting").to_numpy()
    return log1p_normalize(counts, counts.sum(1))[control][:n], counts.sum(1)[control][:n]


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_onnx_predictions_match_torch(run, mode):
    steps = {"steps": 12, "guidance": 2.0} if mode == "sampled" else {}
    torch_side = LatentDeltaPredictor(run.run, mode, **steps)
    onnx_side = OnnxLatentDeltaPredictor(Bundle.load(run.bundle), mode, **steps)
    assert onnx_side.name == torch_side.name == f"latent-delta-{mode}"
    assert onnx_side.run_labels == torch_side.run_labels
    x, _ = _controls(run)
    label = torch_side.run_labels.perturbations[0]
    got = [p.latent(x, label, np.random.default_rng(3)) for p in (torch_side, onnx_side)]
    np.testing.assert_allclose(got[1], got[0], atol=2e-4, rtol=1e-4)
    means = [p.predict(x, label, "") for p in (torch_side, onnx_side)]
    np.testing.assert_allclose(means[1], means[0], atol=2e-4, rtol=1e-4)
    z_c = torch_side.bridge.encode_numpy(x)
    assert np.abs(got[0] - z_c).mean() > 1e-3  # a real move, not the controls back


def test_sampling_draws_differ_by_seed_and_repeat_by_seed(run):
    onnx_side = OnnxLatentDeltaPredictor(Bundle.load(run.bundle), "sampled", steps=8)
    x, _ = _controls(run, 20)
    label = onnx_side.run_labels.perturbations[0]
    a, b, c = (onnx_side.latent(x, label, np.random.default_rng(s)) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    return blocked_env(tmp_path_factory.mktemp("no_torch_latent_delta"))


def test_runtime_predict_without_torch(run, no_torch, tmp_path):
    args = ("predict", "--bundle", run.bundle, "--controls", run.root / "test.h5ad",
            "--cells-per-perturbation", 6)  # fmt: skip
    trained = [x for x in run.meta["latent_delta"]["trained"] if x != "non-targeting"]
    for mode, extra in (("sampled", ("--steps", 5, "--guidance", 1.5)), ("deterministic", ())):
        out = tmp_path / f"{mode}.h5ad"
        done = runtime(no_torch, *args, "--mode", mode, *extra, "--perturbations", "all",
                        "--out", out, "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["n_perturbations"] == len(trained)
        pred = ad.read_h5ad(out)
        assert (pred.obs["source"] == f"latent-delta-{mode}").sum() == 6 * 2 * len(trained)
    refusals = (("--perturbations", run.held[0]),
                ("--perturbations", "all", "--mode", "deterministic", "--steps", 4),
                ("--perturbations", "all", "--unseen", "generic"))  # fmt: skip
    for extra in refusals:
        refused = runtime(no_torch, *args, *extra, "--out", tmp_path / "no.h5ad")
        assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "no.h5ad").exists()
