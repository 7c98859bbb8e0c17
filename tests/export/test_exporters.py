"""``export_run`` on real tiny runs: what each bundle holds, that every file is a checked
ONNX model of opset >= 18 with dynamic batch (and set) sizes, the metadata (in
metadata.json and in each file's metadata_props), parity with torch per component, and
refusals (opset 17, a non-run, nothing left behind)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import open_store
from latentcell.export.runtime.bundle import PROPS_KEY, embedded_metadata

from .conftest import export

GENERATION = {"denoiser", "conditioner", "denoiser_shared", "denoiser_body", "vae_encoder",
              "vae_decoder"}  # fmt: skip
EXPECTED = {
    "vae": ("autoencoder", {"vae_encoder", "vae_decoder"}),
    "dit": ("generation", GENERATION),
    "flow": ("generation", GENERATION),
    "st": ("prediction", {"set_model"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_component_is_a_checked_onnx_model_with_the_metadata(bundles, name):
    kind, components = EXPECTED[name]
    metadata = json.loads((getattr(bundles, name) / "metadata.json").read_text())
    assert metadata["kind"] == kind and set(metadata["components"]) == components
    for component, spec in metadata["components"].items():
        model = onnx.load(str(getattr(bundles, name) / spec["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        props = {p.key: p.value for p in model.metadata_props}
        assert props["latentcell.component"] == component
        assert json.loads(props[PROPS_KEY]) == embedded_metadata(metadata)
        parity = spec["parity"]
        assert parity["max_rel_error"] <= parity["tolerance"] == 1e-4


def test_metadata_records_genes_schedule_conditions_and_provenance(runs, bundles):
    meta = bundles.meta["dit"]
    store = open_store(runs.store).meta
    assert meta["genes"]["gene_key"] == [str(g) for g in store.var.index]  # in order
    assert meta["genes"]["gene_symbol"] == [str(g) for g in store.var["gene_symbol"]]
    assert meta["normalization"]["target_sum"] == 1e4
    g = meta["generation"]
    assert g["conditions"]["categories"]["cell_type"] == store.categories["cell_type"]
    assert len(g["diffusion"]["alphas_cumprod"]) == g["diffusion"]["n_train_steps"] == 1000
    assert g["latent_scale"] > 0 and len(g["latent_shift"]) == meta["vae"]["n_latent"] == 4
    assert g["library"]["groups"] and meta["vae"]["likelihood"] == "nb"
    assert "alphas_cumprod" not in bundles.meta["flow"]["generation"]["diffusion"]
    source = meta["source"]
    assert source["mlflow_run_id"] and source["tracking_uri"].startswith("sqlite:///")
    assert meta["versions"]["opset"] == 20 and meta["versions"]["torch"] == torch.__version__
    files = meta["files"]
    assert set(files) == {s["file"] for s in meta["components"].values()}
    assert all(len(h) == 64 for h in files.values())
    p = bundles.meta["st"]["prediction"]
    assert runs.held in p["labels"] and runs.held not in p["trained"]
    assert p["generic"] and p["target_effect"] and p["basal"] == "train"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_dynamic_batch_and_set_size(bundles):
    sess = _session(bundles.st / "set_model.onnx")
    n_genes = len(bundles.meta["st"]["genes"]["gene_key"])
    shapes = []
    for b, s in ((1, 1), (3, 7), (2, 200)):
        feeds = {
            "control": np.random.default_rng(b).random((b, s, n_genes), dtype=np.float32),
            "perturbation": np.zeros(b, np.int64), "mask": np.ones((b, s), bool),
            "cell_type": np.zeros(b, np.int64), "generic": np.zeros(b, bool),
            "targets": np.zeros((b, n_genes), np.float32),
        }  # fmt: skip
        shapes.append(sess.run(None, feeds)[0].shape)
    assert shapes == [(1, 1, n_genes), (3, 7, n_genes), (2, 200, n_genes)]
    den = _session(bundles.dit / "denoiser.onnx")
    for n in (1, 5, 1000):
        feeds = {"x": np.zeros((n, 4), np.float32), "t": np.full(n, 0.3, np.float32),
                 "codes": np.zeros((n, 1), np.int64)}  # fmt: skip
        assert den.run(None, feeds)[0].shape == (n, 4)


def test_parity_recomputed_at_new_sizes(runs, bundles):
    """Beyond the export-time check: the denoiser and the decoder against torch here."""
    from latentcell.inference.generate import CellGenerator

    gen = CellGenerator.load(runs.dit)
    rng = np.random.default_rng(3)
    n = 37
    x, t = rng.standard_normal((n, 4), dtype=np.float32), rng.random(n, dtype=np.float32)
    codes = rng.integers(0, 3, (n, 1))  # 2 = the null code of 2 cell types
    with torch.no_grad():
        want = gen.dit.dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(codes),
                           torch.zeros(n, 0)).numpy()  # fmt: skip
    got = _session(bundles.dit / "denoiser.onnx").run(None, {"x": x, "t": t, "codes": codes})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)  # tolerance stated in the README
    library = rng.uniform(500, 5000, n).astype(np.float32)
    batch = rng.integers(0, 2, n)
    with torch.no_grad():
        params = gen.vae.decode(
            torch.from_numpy(x), torch.from_numpy(library), torch.from_numpy(batch)
        )
    mu, theta = _session(bundles.dit / "vae_decoder.onnx").run(
        ["mu", "theta"], {"latent": x, "library_size": library, "batch": batch}
    )
    np.testing.assert_allclose(mu, params["mu"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(theta, params["theta"].numpy(), rtol=1e-5)


def test_opset_17_and_a_non_run_are_refused_and_nothing_is_written(runs, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export(runs.vae, tmp_path / "old", opset=17)
    with pytest.raises(DataValidationError, match="not a finished training run"):
        export(tmp_path, tmp_path / "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_latent_st_and_pretraining_runs_export(more_runs, tmp_path):
    """A latent-space ST exports its VAE beside the set model and predicts through it as the
    torch predictor does; a pretraining run exports its set model (kind "pretraining")."""
    from latentcell.export.runtime import Bundle, OnnxSetPredictor
    from latentcell.inference.st_predictor import STPredictor

    meta = export(more_runs.st_latent, tmp_path / "latent")
    assert set(meta["components"]) == {"set_model", "vae_encoder", "vae_decoder"}
    assert meta["prediction"]["space"] == "latent" and meta["vae"]["batch_column"] is None
    torch_st = STPredictor(more_runs.st_latent)
    onnx_st = OnnxSetPredictor(Bundle.load(tmp_path / "latent"))
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (20, len(torch_st.genes)))).astype(
        np.float32
    )
    label, cell_type = torch_st.labels[1], torch_st.cell_types[0]
    np.testing.assert_allclose(onnx_st.predict(x, label, cell_type),
                               torch_st.predict(x, label, cell_type), atol=1e-4)  # fmt: skip
    library = np.full(20, 2000.0, np.float32)
    sampled = onnx_st.predict(x, label, cell_type, library, np.random.default_rng(1))
    assert sampled.shape == x.shape and (sampled >= 0).all()
    pre = export(more_runs.st_pretrain, tmp_path / "pre")
    assert pre["kind"] == "pretraining" and set(pre["components"]) == {"set_model"}
    with pytest.raises(DataValidationError, match="does not predict"):
        OnnxSetPredictor(Bundle.load(tmp_path / "pre"))


def test_new_combinations_of_trained_genes_are_added_at_export(more_runs, tmp_path):
    """A gene_table model embeds any combination of trained genes: --add-perturbations puts
    one in the bundle's vocabulary, and the runtime predicts it as torch does."""
    from latentcell.export.runtime import Bundle, OnnxSetPredictor
    from latentcell.inference.st_predictor import STPredictor

    torch_st = STPredictor(more_runs.st_gene_table)
    a, b = [x for x in torch_st.trained if x != "non-targeting"][:2]
    combo = f"{a}+{b}"
    meta = export(more_runs.st_gene_table, tmp_path / "b", add_perturbations=[combo])
    assert combo in meta["prediction"]["labels"]
    onnx_st = OnnxSetPredictor(Bundle.load(tmp_path / "b"))
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (16, len(torch_st.genes)))).astype(
        np.float32
    )
    cell_type = torch_st.cell_types[0]
    np.testing.assert_allclose(onnx_st.predict(x, combo, cell_type),
                               torch_st.predict(x, combo, cell_type), atol=1e-5)  # fmt: skip
    with pytest.raises(DataValidationError, match="--add-perturbations"):
        OnnxSetPredictor(Bundle.load(bundles_dir := tmp_path / "b")).predict(
            x, f"{b}+{a}x", cell_type
        )
    assert bundles_dir.exists()
