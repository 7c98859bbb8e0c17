"""A cvae run (batch-conditioned, so every condition input is exercised) exported to ONNX:
the bundle's graphs and "cvae" section, its predictions against torch's, and the runtime's
``predict`` command where importing torch fails."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.export.onnx_io import TOLERANCE
from latentcell.export.runtime import Bundle
from latentcell.export.runtime.cvae_predict import OnnxCVAEPredictor
from latentcell.inference.cvae_predictor import CVAEPredictor
from latentcell.inference.predict import log1p_normalize
from tests.cvae_runs import trained_cvae
from tests.export.exported_runs import exported
from tests.no_torch import blocked_env, runtime


@pytest.fixture(scope="module")
def cvae(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvae_export")
    return exported(trained_cvae(root, "model.batch_conditioning=true", "train.max_steps=60"), root)


def test_the_bundle_holds_both_conditional_graphs_and_the_cvae_section(cvae):
    meta = cvae.meta
    assert meta["kind"] == "cvae" and set(meta["components"]) == {"vae_encoder", "vae_decoder"}
    encoder, decoder = meta["components"]["vae_encoder"], meta["components"]["vae_decoder"]
    roles = ["perturbation", "cell_type", "batch"]
    assert list(encoder["inputs"]) == ["counts", "library_size", *roles]
    assert list(decoder["inputs"]) == ["latent", "library_size", *roles]
    assert decoder["outputs"] == ["mu", "theta"]
    assert max(c["parity"]["max_rel_error"] for c in meta["components"].values()) < TOLERANCE
    section = meta["cvae"]
    card = json.loads((cvae.run / "final" / "model_config.json").read_text())
    assert section["labels"] == card["categories"]["perturbation"]
    assert section["control_label"] == "non-targeting" and section["likelihood"] == "nb"
    assert section["columns"]["perturbation"] == "target_gene"
    assert section["cell_types"] == card["categories"]["cell_type"]
    assert section["batches"] == card["categories"]["batch"]
    assert section["batch"] == card["default_batch"] in section["batches"]
    assert cvae.held[0] not in section["trained"]
    assert meta["genes"]["gene_key"] == card["genes"]


@pytest.mark.parametrize("mode", ["a", "b"])
def test_onnx_predictions_match_torch(cvae, mode):
    torch_side = CVAEPredictor(cvae.run, mode)
    onnx_side = OnnxCVAEPredictor(Bundle.load(cvae.bundle), mode)
    assert onnx_side.name == torch_side.name == f"cvae-{mode}"
    assert onnx_side.run_labels == torch_side.run_labels
    test = cvae.test
    columns = pd.Index(test.var["gene_id"]).get_indexer(torch_side.genes)
    x = log1p_normalize(test.X.toarray()[:, columns], test.X.toarray().sum(1))[:40]
    label, cell_type = torch_side.run_labels.perturbations[0], torch_side.cell_types[1]
    for rng_seed in (None, 7):  # mode a draws z from the rng (seed 0 without one)
        got = [p.predict(x, label, cell_type, None, None if rng_seed is None
                         else np.random.default_rng(rng_seed)) for p in (torch_side, onnx_side)]  # fmt: skip
        np.testing.assert_allclose(got[1], got[0], atol=2e-4, rtol=1e-4)
    assert np.abs(got[0] - x).mean() > 0  # a real prediction, not the controls back


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    return blocked_env(tmp_path_factory.mktemp("no_torch_cvae"))


def test_runtime_predict_without_torch(cvae, no_torch, tmp_path):
    args = ("predict", "--bundle", cvae.bundle, "--controls", cvae.root / "test.h5ad",
            "--cells-per-perturbation", 6)  # fmt: skip
    for mode in ("a", "b"):
        out = tmp_path / f"{mode}.h5ad"
        done = runtime(
            no_torch, *args, "--mode", mode, "--perturbations", "all", "--out", out, "--json"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["n_perturbations"] == len(cvae.meta["cvae"]["trained"]) - 1
        pred = ad.read_h5ad(out)
        assert (pred.obs["source"] == f"cvae-{mode}").sum() == 6 * 2 * (
            len(cvae.meta["cvae"]["trained"]) - 1
        )  # x 2 cell types
    for extra in (("--perturbations", cvae.held[0]), ("--perturbations", "all", "--unseen",
                                                      "generic")):  # fmt: skip
        refused = runtime(no_torch, *args, *extra, "--out", tmp_path / "no.h5ad")
        assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "no.h5ad").exists()
