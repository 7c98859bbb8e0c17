"""A multiomics run exported to ONNX: four graphs (both encoders, both decoders) and the
"multiomics" section; each graph in an onnxruntime session matches torch on real cells, and
the two chained as the section says translate exactly as ``latentcell predict --to`` does."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import anndata as ad
import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentcell.export.exporters import export_run
from latentcell.inference.multiomics_translator import load_translator
from tests.multiomics_data import trained_multiomics


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiomics_export")
    tiny = trained_multiomics(root, "model.rna_likelihood=zinb", steps=60)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        meta = export_run(tiny.run, root / "bundle")
    tiny.bundle, tiny.meta = root / "bundle", meta
    return tiny


def _session(bundle, name: str) -> ort.InferenceSession:
    path = bundle.bundle / bundle.meta["components"][name]["file"]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_bundle_holds_four_graphs_and_the_translation_section(bundle):
    meta = bundle.meta
    assert meta["kind"] == "multiomics"
    assert set(meta["components"]) == {"rna_encoder", "protein_encoder", "rna_decoder",
                                       "protein_decoder"}  # fmt: skip
    assert meta["components"]["rna_decoder"]["outputs"] == ["mu", "theta", "zi_logits"]
    assert meta["components"]["protein_decoder"]["outputs"] == ["mu", "theta"]
    card = json.loads((bundle.run / "final" / "model_config.json").read_text())
    section = meta["multiomics"]
    assert section["proteins"] == card["proteins"] and meta["genes"]["gene_key"] == card["genes"]
    assert section["protein_library"] == card["protein_library"]
    assert section["translate"]["protein"] == ["rna_encoder", "protein_decoder"]


def test_every_graph_matches_torch_on_real_cells(bundle):
    translator = load_translator(bundle.run)
    model = translator.model
    cells = ad.read_h5ad(bundle.test)
    counts = {"rna": translator.rna_matrix(cells, "test"),
              "protein": translator.protein_matrix(cells, "test")}  # fmt: skip
    for modality in ("rna", "protein"):
        x = counts[modality].astype(np.float32)
        library = x.sum(1)
        mean, log_var = _session(bundle, f"{modality}_encoder").run(
            None, {"counts": x, "library_size": library})  # fmt: skip
        with torch.no_grad():
            want = model.part(modality).encode(torch.from_numpy(x), torch.from_numpy(library))
        np.testing.assert_allclose(mean, want[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(log_var, want[1].numpy(), rtol=1e-4, atol=1e-4)
        decoder = _session(bundle, f"{modality}_decoder")
        got = decoder.run(None, {"latent": mean, "library_size": library})
        with torch.no_grad():
            params = model.part(modality).decode(torch.from_numpy(mean), torch.from_numpy(library))
        names = [o.name for o in decoder.get_outputs()]
        for name, value in zip(names, got, strict=True):
            np.testing.assert_allclose(value, params[name].numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("source", "target"), [("rna", "protein"), ("protein", "rna")])
def test_chained_graphs_translate_as_torch_does(bundle, source, target):
    translator = load_translator(bundle.run)
    cells = ad.read_h5ad(bundle.test)
    matrix = translator.rna_matrix if source == "rna" else translator.protein_matrix
    x = matrix(cells, "test").astype(np.float32)
    encoder, decoder = bundle.meta["multiomics"]["translate"][target]
    mean, _ = _session(bundle, encoder).run(None, {"counts": x, "library_size": x.sum(1)})
    ones = np.ones(len(x), np.float32)
    mu = _session(bundle, decoder).run(["mu"], {"latent": mean, "library_size": ones})[0]
    np.testing.assert_allclose(mu, translator.proportions(x, source, target), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("to", ["protein", "rna"])
def test_the_runtime_translates_without_torch_as_predict_does(bundle, tmp_path, to):
    """``python -m latentcell.export.runtime translate`` where importing torch fails writes
    the file ``latentcell predict --to`` writes, to float32 precision."""
    from latentcell.launch.cli import main
    from tests.no_torch import blocked_env, runtime

    torch_out, onnx_out = tmp_path / "torch.h5ad", tmp_path / "onnx.h5ad"
    assert main(["predict", "--run", str(bundle.run), "--cells", str(bundle.test), "--to", to,
                 "--out", str(torch_out), "--json"]) == 0  # fmt: skip
    done = runtime(blocked_env(tmp_path), "translate", "--bundle", bundle.bundle, "--cells",
                   bundle.test, "--to", to, "--out", onnx_out, "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_cells"] == 100
    a, b = ad.read_h5ad(torch_out), ad.read_h5ad(onnx_out)
    if to == "protein":
        a, b = a.obsm["protein_counts"], b.obsm["protein_counts"]
        assert list(a.columns) == list(b.columns)
        a, b = a.to_numpy(), b.to_numpy()
    else:
        assert list(a.var_names) == list(b.var_names)
        a, b = a.X, b.X
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    refused = runtime(blocked_env(tmp_path), "translate", "--bundle", bundle.bundle, "--cells",
                      tmp_path / "absent.h5ad", "--to", to, "--out", tmp_path / "no.h5ad")  # fmt: skip
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
