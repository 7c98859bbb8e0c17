"""A masked-diffusion run exported to ONNX: the bundle's two graphs and its "masked_diffusion"
section, its logits against torch's, the same cells from torch and ONNX for one seed (the
shared numpy sampler), and the runtime's ``predict`` where importing torch fails."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from latentcell.export.onnx_io import TOLERANCE
from latentcell.export.runtime import Bundle
from latentcell.export.runtime.masked_diffusion_predict import OnnxMaskedDiffusionPredictor
from latentcell.inference.masked_diffusion_predictor import MaskedDiffusionPredictor
from latentcell.inference.masked_diffusion_sampling import masked_diffusion_settings
from latentcell.inference.predict import _dense, log1p_normalize
from tests.export.exported_runs import exported
from tests.masked_diffusion_runs import trained_masked_diffusion
from tests.no_torch import blocked_env, runtime


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked_diffusion_export")
    return exported(trained_masked_diffusion(root, steps=100), root)


def test_the_bundle_holds_the_two_graphs_and_the_section(run):
    meta = run.meta
    assert meta["kind"] == "masked-diffusion"
    components = meta["components"]
    assert set(components) == {"control_encoder", "denoiser"}
    assert components["control_encoder"]["inputs"]["control"]["shape"] == ["n", "s", 60]
    inputs = components["denoiser"]["inputs"]
    assert list(inputs) == ["tokens", "control_bins", "memory", "perturbation"]
    assert [inputs[k]["dtype"] for k in inputs] == ["int64", "int64", "float32", "int64"]
    assert [inputs[k]["shape"] for k in inputs] == [
        ["n", "s", 60], ["n", "s", 60], ["n", "c", 32], ["n"]]  # fmt: skip
    assert components["denoiser"]["outputs"] == ["logits"]
    assert max(c["parity"]["max_rel_error"] for c in components.values()) < TOLERANCE
    card = json.loads((run.run / "final" / "model_config.json").read_text())
    section = meta["masked_diffusion"]
    assert section == masked_diffusion_settings(card)
    assert run.held[0] not in section["trained"] and run.held[0] in section["labels"]
    assert section["null_code"] == len(section["labels"]) and len(section["edges"]) == 8


def test_onnx_logits_match_torch(run):
    """Random bins (MASK included) and paired-control bins, sets of 5 generated cells over 7
    controls, every code."""
    torch_side = MaskedDiffusionPredictor(run.run)
    bundle = Bundle.load(run.bundle)
    model, n_bins = torch_side.model, run.meta["masked_diffusion"]["n_bins"]
    rng = np.random.default_rng(0)
    codes = np.arange(model.config.null_code + 1, dtype=np.int64)  # the null code too
    control = np.log1p(rng.poisson(2.0, (len(codes), 7, 60))).astype(np.float32)
    tokens = rng.integers(0, n_bins + 1, (len(codes), 5, 60))
    paired = rng.integers(0, n_bins, (len(codes), 5, 60))
    memory = bundle["control_encoder"].run(control=control)["memory"]
    with torch.no_grad():
        expected_memory = model.encode_controls(torch.from_numpy(control)).numpy()
        arrays = (tokens, paired, expected_memory, codes)
        expected = model.logits(*(torch.from_numpy(a) for a in arrays)).numpy()
    np.testing.assert_allclose(memory, expected_memory, atol=1e-4, rtol=1e-4)
    got = bundle["denoiser"].run(tokens=tokens, control_bins=paired, memory=memory,
                                 perturbation=codes)["logits"]  # fmt: skip
    assert got.shape == (len(codes), 5, 60, n_bins)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _controls(run, n=40):
    test = run.test
    counts = _dense(test.X)
    control = (test.obs["target_gene"] == "non-targeting").to_numpy()
    return log1p_normalize(counts, counts.sum(1))[control][:n]


def test_onnx_cells_match_torch_for_one_seed(run):
    """The same sampler and draws: bins can differ only where a Gumbel draw sits on a
    near-tie of float error, so nearly every value is equal."""
    sampling = {"steps": 6, "guidance": 2.0}
    torch_side = MaskedDiffusionPredictor(run.run, **sampling)
    onnx_side = OnnxMaskedDiffusionPredictor(Bundle.load(run.bundle), **sampling)
    assert onnx_side.name == torch_side.name == "masked-diffusion"
    assert onnx_side.run_labels == torch_side.run_labels
    x = _controls(run)  # 40 controls: sets of 16, the last one topped up
    label = torch_side.run_labels.perturbations[0]
    got = [p.predict(x, label, "", rng=np.random.default_rng(3)) for p in (torch_side, onnx_side)]
    assert np.isclose(got[1], got[0], atol=1e-4).mean() >= 0.99
    assert (got[0] > 0).any() and np.abs(got[0] - x).mean() > 1e-2  # cells, not controls back
    other = onnx_side.predict(x, label, "", rng=np.random.default_rng(4))
    assert np.abs(other - got[1]).mean() > 1e-2  # another seed, other draws


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    return blocked_env(tmp_path_factory.mktemp("no_torch_masked_diffusion"))


def test_runtime_predict_without_torch(run, no_torch, tmp_path):
    args = ("predict", "--bundle", run.bundle, "--controls", run.root / "test.h5ad",
            "--cells-per-perturbation", 6)  # fmt: skip
    trained = [x for x in run.meta["masked_diffusion"]["trained"] if x != "non-targeting"]
    for name, extra in (("default", ()), ("sampled", ("--steps", 4, "--guidance", 1.5))):
        out = tmp_path / f"{name}.h5ad"
        done = runtime(no_torch, *args, *extra, "--perturbations", "all", "--out", out, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["n_perturbations"] == len(trained)
        pred = ad.read_h5ad(out)
        assert (pred.obs["source"] == "masked-diffusion").sum() == 6 * 2 * len(trained)
    refusals = (("--perturbations", run.held[0]),
                ("--perturbations", "all", "--unseen", "generic"),
                ("--perturbations", "all", "--mode", "sampled"))  # fmt: skip
    for extra in refusals:
        refused = runtime(no_torch, *args, *extra, "--out", tmp_path / "no.h5ad")
        assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "no.h5ad").exists()
