"""``inference/gene_names.py`` on the bundles: the runtime's files follow the same gene rule
as the torch commands, and the runtime's readers (``predict``, HTTP ``/predict``) take gene
keys, Ensembl ids and symbols alike, naming the JSON field when a gene is missing."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.atomic import write_h5ad_atomic
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.export.exporters import run_genes
from latentcell.export.runtime import Bundle, OnnxGenerator
from latentcell.export.runtime.cli import main as runtime_main
from latentcell.export.runtime.service import BundleService, ServiceLimits, make_server
from latentcell.inference.generate import CellGenerator
from latentcell.trainer.st_stage import split_source_rows


def test_generated_files_are_keyed_by_the_vocabulary_with_ids_and_symbols(runs, bundles, tmp_path):
    genes = bundles.meta["dit"]["genes"]
    onnx = OnnxGenerator(Bundle.load(bundles.dit)).generate(2, {"cell_type": "*"}).to_anndata()
    written = ad.read_h5ad(write_h5ad_atomic(onnx, tmp_path / "gen.h5ad"))
    torch_side = CellGenerator.load(runs.dit).generate(2, {"cell_type": "*"})
    for adata in (written, torch_side):
        assert list(adata.var_names) == genes["gene_key"]
        assert list(adata.var["gene_id"]) == genes["gene_id"]
        assert list(adata.var["gene_symbol"]) == genes["gene_symbol"]


def _controls(runs, tmp_path, name: str, by: str):
    """The run's test cells as a controls file named by ``by`` ("symbol": the VCC input's own
    var_names, no id column; "id": Ensembl ids in reverse order)."""
    cells = ad.read_h5ad(runs.store.parent / "cells.h5ad")
    test = cells[split_source_rows(runs.st, runs.store)["test"]].copy()
    if by == "id":
        test = test[:, ::-1].copy()
        test.var_names = test.var["gene_id"].astype(str).to_numpy()
    del test.var["gene_id"]
    path = tmp_path / f"{name}.h5ad"
    test.write_h5ad(path)
    return path, test


def test_runtime_predict_takes_ids_or_symbols_and_keeps_the_controls_names(runs, bundles, tmp_path):
    genes = bundles.meta["st"]["genes"]
    symbol_of = dict(zip(genes["gene_id"], genes["gene_symbol"], strict=True))
    written = {}
    for by in ("symbol", "id"):
        path, controls = _controls(runs, tmp_path, by, by)
        out = tmp_path / f"pred_{by}.h5ad"
        argv = ["predict", "--bundle", str(bundles.st), "--controls", str(path),
                "--perturbations", "all", "--cells-per-perturbation", "4", "--out", str(out)]  # fmt: skip
        assert runtime_main(argv) == 0
        written[by] = pred = ad.read_h5ad(out)
        assert list(pred.var_names) == list(controls.var_names)
        assert [symbol_of[g] for g in pred.var["gene_id"]] == list(pred.var["gene_symbol"])
    np.testing.assert_array_equal(written["id"].X.toarray(), written["symbol"].X.toarray()[:, ::-1])


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_predict_takes_symbols_and_names_the_json_field(runs, bundles):
    meta = bundles.meta["st"]
    genes = meta["genes"]
    counts = np.random.default_rng(0).poisson(2.0, (4, len(genes["gene_key"]))).tolist()
    body = {"controls": {"counts": counts, "cell_type": meta["prediction"]["cell_types"][0]},
            "perturbations": [runs.held], "unseen": "generic", "seed": 1}  # fmt: skip
    limits = ServiceLimits(concurrency=1, queue=2)
    with make_server(Bundle.load(bundles.st, threads=1), "127.0.0.1", 0, limits).start() as s:
        answers = {}
        for column in ("gene_key", "gene_id", "gene_symbol"):
            named = dict(body, controls=dict(body["controls"], genes=genes[column]))
            status, answers[column] = _post(s.url, named)
            assert status == 200 and answers[column]["genes"] == genes[column]
        unnamed = _post(s.url, body)[1]  # no names: the bundle's keys, in order
        assert unnamed["genes"] == genes["gene_key"]
        for answer in answers.values():
            assert answer["predictions"] == unnamed["predictions"]
        unknown = dict(body, controls=dict(body["controls"],
                                           genes=["NOT_A_GENE", *genes["gene_symbol"][1:]]))  # fmt: skip
        status, error = _post(s.url, unknown)
    assert status == 400 and error["field"] == "controls.genes", error
    assert genes["gene_key"][0] in error["error"] and "--" not in error["error"]


def test_http_refuses_an_untrained_cell_type_as_a_json_field(held_type):
    service = BundleService(Bundle.load(held_type.bundle, threads=1))
    n = len(held_type.meta["genes"]["gene_key"])
    body = {"controls": {"counts": [[1] * n], "cell_type": held_type.held},
            "perturbations": ["non-targeting"]}  # fmt: skip
    with pytest.raises(DataValidationError) as err:
        service.predict(body)
    assert err.value.field == "controls.cell_type" and held_type.kept in err.value.fix
    assert "--" not in str(err.value)


def test_a_bundle_without_its_store_keeps_the_cards_keys_and_symbols():
    card = {"genes": ["ENSG00000000001", "FOO"], "gene_symbols": ["A", "FOO"],
            "store": "/no/such/store"}  # fmt: skip
    assert run_genes(card) == {"gene_key": ["ENSG00000000001", "FOO"],
                               "gene_id": ["ENSG00000000001", ""],
                               "gene_symbol": ["A", "FOO"]}  # fmt: skip
