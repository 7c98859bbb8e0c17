"""The onnxruntime runtime against torch: the whole sampler with fixed noise (DDIM and flow,
with guidance), decoded counts in distribution, ST prediction cell for cell (trained, zero-
shot generic), and input validation (tampered or swapped files, unknown conditions, gene
mismatches, wrong dtypes and shapes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.export.runtime import Bundle, OnnxGenerator, OnnxSetPredictor
from latentcell.inference.generate import CellGenerator
from latentcell.inference.st_predictor import STPredictor

SAMPLER_TOLERANCE = 1e-4  # max |latent ORT - latent torch| after the whole sampler


@pytest.mark.parametrize("name", ["dit", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_whole_sampler_matches_torch_with_fixed_noise(runs, bundles, name, guidance):
    torch_gen = CellGenerator.load(getattr(runs, name))
    onnx_gen = OnnxGenerator(Bundle.load(getattr(bundles, name)))
    rows = torch_gen.condition_rows(20, {"cell_type": "*"})
    noise = np.random.default_rng(0).standard_normal((len(rows), 4)).astype(np.float32)
    want = torch_gen.dit.sample(torch.from_numpy(rows.codes), torch.from_numpy(rows.values),
                                12, guidance, noise=torch.from_numpy(noise)).numpy()  # fmt: skip
    got = onnx_gen.sample_latents(rows, 12, guidance, noise=noise)
    assert np.abs(want).max() > 0.5  # the sampler moved the noise: the comparison means something
    np.testing.assert_allclose(got, want, atol=SAMPLER_TOLERANCE)


def test_generated_counts_match_torch_in_distribution(runs, bundles):
    """Same latents and library sizes, counts drawn by each side's own RNG: per-gene means
    agree within sampling error (and the decoder means exactly)."""
    torch_gen = CellGenerator.load(runs.dit)
    onnx_gen = OnnxGenerator(Bundle.load(bundles.dit))
    rows = torch_gen.condition_rows(3000, {"cell_type": "*"})
    z = torch_gen.sample_latents(rows, 4, 1.0)
    counts_torch, library, batch = torch_gen.decode(z, rows, seed=0)
    params = onnx_gen.decoder_parameters(z.numpy(), library, batch)
    from latentcell.export.runtime.likelihoods import sample_counts

    counts_onnx = sample_counts(params, library, np.random.default_rng(0))
    mu = params["mu"].mean(0)
    a, b = np.asarray(counts_torch.mean(0)).ravel(), counts_onnx.mean(0)
    busy = mu > 1.0
    assert busy.sum() > 10
    rel = np.abs(a[busy] - b[busy]) / mu[busy]
    assert np.median(rel) < 0.05 and np.abs(b[busy] - mu[busy]).max() / mu[busy].max() < 0.1


def test_generate_writes_the_same_file_layout_as_torch(runs, bundles):
    cells = OnnxGenerator(Bundle.load(bundles.dit)).generate(5, {"cell_type": "*"}, seed=1)
    adata = cells.to_anndata()
    reference = CellGenerator.load(runs.dit).generate(5, {"cell_type": "*"}, seed=1)
    assert list(adata.var_names) == list(reference.var_names)
    assert list(adata.obs.columns) == list(reference.obs.columns)
    assert adata.obs["cell_type"].tolist() == reference.obs["cell_type"].tolist()
    assert adata.obsm["X_latent"].shape == reference.obsm["X_latent"].shape
    x = adata.X.toarray()
    assert (x == np.round(x)).all() and (x >= 0).all() and x.sum() > 0
    again = OnnxGenerator(Bundle.load(bundles.dit)).generate(5, {"cell_type": "*"}, seed=1)
    np.testing.assert_array_equal(again.counts, cells.counts)  # seeded


def test_set_model_prediction_matches_torch(runs, bundles):
    torch_st = STPredictor(runs.st)
    onnx_st = OnnxSetPredictor(Bundle.load(bundles.st))
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(1.0, (37, len(torch_st.genes)))).astype(np.float32)  # 3 sets, ragged
    trained = next(p for p in torch_st.labels if p != "non-targeting" and torch_st.is_trained(p))
    cell_type = torch_st.cell_types[1]
    np.testing.assert_allclose(onnx_st.predict(x, trained, cell_type),
                               torch_st.predict(x, trained, cell_type), atol=1e-5)  # fmt: skip
    with pytest.raises(DataValidationError, match="generic"):
        onnx_st.predict(x, runs.held, cell_type)  # held out: refused by default, like torch
    generic_torch = STPredictor(runs.st, unseen="generic").predict(x, runs.held, cell_type)
    generic_onnx = OnnxSetPredictor(Bundle.load(bundles.st), "generic").predict(
        x, runs.held, cell_type
    )
    np.testing.assert_allclose(generic_onnx, generic_torch, atol=1e-5)
    with pytest.raises(DataValidationError, match="not a cell type of the run's store"):
        onnx_st.predict(x, trained, "no such type")
    with pytest.raises(DataValidationError, match="log1p expression on the bundle's genes"):
        onnx_st.predict(x[:, :-1], trained, cell_type)


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / bundle.name)


def test_tampered_file_is_refused(bundles, tmp_path):
    copy = _copy(bundles.dit, tmp_path)
    with open(copy / "denoiser.onnx", "r+b") as f:  # flip one byte of the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataValidationError, match="sha256"):
        Bundle.load(copy)


def test_file_from_another_bundle_is_refused_even_with_rewritten_hashes(bundles, tmp_path):
    copy = _copy(bundles.dit, tmp_path)
    shutil.copy(bundles.flow / "denoiser.onnx", copy / "denoiser.onnx")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["files"]["denoiser.onnx"] = sha256_file(copy / "denoiser.onnx")
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError, match="another export"):
        Bundle.load(copy)


def test_missing_metadata_and_wrong_format_are_refused(bundles, tmp_path):
    with pytest.raises(DataValidationError, match="not a bundle directory"):
        Bundle.load(tmp_path)
    copy = _copy(bundles.vae, tmp_path)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["format_version"] = 99
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError, match="format_version"):
        Bundle.load(copy)


def test_inputs_are_validated_before_onnxruntime(bundles):
    bundle = Bundle.load(bundles.vae)
    encoder = bundle["vae_encoder"]
    n_genes = len(bundle.genes)
    good = np.ones((3, n_genes), np.float32)
    assert encoder.run(counts=good, library_size=good.sum(1))["mean"].shape == (3, 4)
    with pytest.raises(DataValidationError, match="dtype float64, expected float32"):
        encoder.run(counts=good.astype(np.float64), library_size=good.sum(1))
    with pytest.raises(DataValidationError, match=rf"shape \(3, {n_genes - 1}\)"):
        encoder.run(counts=good[:, 1:], library_size=good.sum(1))
    with pytest.raises(DataValidationError, match="pass exactly"):
        encoder.run(counts=good)
    with pytest.raises(DataValidationError, match="has no denoiser"):
        bundle["denoiser"]  # noqa: B018


def test_small_calls_use_a_one_thread_session_with_the_same_outputs(bundles):
    from latentcell.export.runtime.bundle import SMALL_ROWS

    denoiser = Bundle.load(bundles.dit, threads=2)["denoiser"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((SMALL_ROWS, 4), dtype=np.float32),
             "t": rng.random(SMALL_ROWS, dtype=np.float32),
             "codes": np.zeros((SMALL_ROWS, 1), np.int64)}  # fmt: skip
    small = denoiser.run(**feeds)["prediction"]
    assert denoiser._small is not None and denoiser._session_for(SMALL_ROWS + 1) is denoiser.session
    pooled = denoiser.session.run(["prediction"], feeds)[0]
    np.testing.assert_allclose(small, pooled, atol=1e-6)
    single = Bundle.load(bundles.dit, threads=1)["denoiser"]
    assert single._session_for(1) is single.session  # one thread: one session


def test_unknown_conditions_are_refused(bundles):
    gen = OnnxGenerator(Bundle.load(bundles.dit))
    with pytest.raises(DataValidationError, match="not a condition of this model"):
        gen.generate(2, {"donor": "x"})
    with pytest.raises(DataValidationError, match="unknown label"):
        gen.generate(2, {"cell_type": "neuron"})
    with pytest.raises(DataValidationError, match="cannot generate"):
        OnnxGenerator(Bundle.load(bundles.st))


def test_held_out_cell_type_is_refused_or_routed_like_torch(held_type):
    """The bundle records the trained cell types and those with a training-control mean; the
    runtime refuses the held-out type by default with torch's words, and with
    unseen_cell_type="unknown" predicts it as torch does (the unknown cell type, the set's
    own mean), saying so in ``routes``."""
    p = held_type.meta["prediction"]
    assert p["trained_cell_types"] == [held_type.kept] and p["unknown_cell_type"]
    assert p["basal_cell_types"] == [held_type.kept] and p["cell_type_conditioning"]
    torch_st, onnx_st = STPredictor(held_type.run), OnnxSetPredictor(Bundle.load(held_type.bundle))
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (37, len(torch_st.genes))))
    x = x.astype(np.float32)
    assert onnx_st.cell_types == torch_st.cell_types
    label = next(x for x in torch_st.labels if x != "non-targeting")
    np.testing.assert_allclose(onnx_st.predict(x, label, held_type.kept),
                               torch_st.predict(x, label, held_type.kept), atol=1e-5)  # fmt: skip
    for predictor in (torch_st, onnx_st):
        with pytest.raises(DataValidationError, match="never trained.*--unseen-cell-type unknown"):
            predictor.predict(x, label, held_type.held)
    torch_u = STPredictor(held_type.run, unseen_cell_type="unknown")
    onnx_u = OnnxSetPredictor(Bundle.load(held_type.bundle), unseen_cell_type="unknown")
    for cell_type in (held_type.held, "a type from elsewhere"):
        np.testing.assert_allclose(onnx_u.predict(x, label, cell_type),
                                   torch_u.predict(x, label, cell_type), atol=1e-5)  # fmt: skip
        assert (
            onnx_u.routes(label, cell_type)
            == torch_u.routes(label, cell_type)
            == {"cell_type": "unknown"}
        )
    assert onnx_u.routes(label, held_type.kept) == {}


def test_controls_without_a_cell_type_column_predict_like_torch(implicit_type, runs, bundles):
    """Controls without the cell-type column, for a run whose store had none: read as the
    build read them (IMPLICIT_LABEL), the same file from torch and from the runtime; for a
    run with real cell types, one error naming the column."""
    import anndata as ad

    from latentcell.data_pipelines.schemas import IMPLICIT_LABEL
    from latentcell.inference.predict import PopulationRequest, predict_population

    torch_st = STPredictor(implicit_type.run)
    onnx_st = OnnxSetPredictor(Bundle.load(implicit_type.bundle))
    assert onnx_st.cell_types == torch_st.cell_types == [IMPLICIT_LABEL]
    labels = tuple(x for x in torch_st.labels if x != "non-targeting")[:2]
    request = PopulationRequest(labels, cells_per_perturbation=12, seed=4)
    files = [predict_population(p, implicit_type.cells, request, "c") for p in (torch_st, onnx_st)]
    assert files[0].n_obs == files[1].n_obs and "cell_type" not in files[1].obs
    assert list(files[0].obs["target_gene"]) == list(files[1].obs["target_gene"])
    x = np.log1p(np.random.default_rng(0).poisson(1.0, (20, len(torch_st.genes))))
    x = x.astype(np.float32)
    np.testing.assert_allclose(onnx_st.predict(x, labels[0], IMPLICIT_LABEL),
                               torch_st.predict(x, labels[0], IMPLICIT_LABEL), atol=1e-5)  # fmt: skip

    typed = ad.read_h5ad(runs.store.parent / "cells.h5ad")
    del typed.obs["cell_type"]
    trained = next(x for x in bundles.meta["st"]["prediction"]["trained"] if x != "non-targeting")
    with pytest.raises(
        DataValidationError, match="cell_type: the controls have no cell-type column"
    ):
        predict_population(OnnxSetPredictor(Bundle.load(bundles.st)), typed,
                           PopulationRequest((trained,), 5), "c")  # fmt: skip
