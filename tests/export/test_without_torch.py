"""The runtime's commands where ``import torch`` fails: generate, predict and serve run from
a bundle in a fresh interpreter whose path starts with a ``torch`` package that raises
ImportError (so any import of torch, direct or through another module, breaks the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import anndata as ad
import numpy as np
import pytest

from latentcell.trainer.st_stage import split_source_rows

BLOCKER = 'raise ImportError("torch is blocked: the runtime must not import it")\n'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_torch")
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(BLOCKER)
    environ = dict(os.environ, PYTHONPATH=str(root))
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=environ,
                             capture_output=True, text=True)  # fmt: skip
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr  # the block works
    return environ


def runtime(env, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "latentcell.export.runtime", *map(str, args)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_the_library_and_service_import_only_numpy_and_onnxruntime(env):
    """anndata (with pandas, scipy, h5py) is imported by the commands that read or write
    h5ad files only; the runtime itself and its HTTP service need numpy and onnxruntime."""
    code = ("import sys, latentcell.export.runtime, latentcell.export.runtime.service; "
            "print([m for m in ('torch', 'anndata', 'pandas', 'scipy', 'h5py', 'mlflow') "
            "if m in sys.modules])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_generate_without_torch(env, bundles, tmp_path):
    out = tmp_path / "gen.h5ad"
    result = runtime(env, "generate", "--bundle", bundles.dit, "--n", 7,
                     "--condition", "cell_type=*", "--seed", 3, "--out", out)  # fmt: skip
    assert json.loads(result.stdout)["n_cells"] == 14
    adata = ad.read_h5ad(out)
    assert adata.shape == (14, len(bundles.meta["dit"]["genes"]["gene_key"]))
    assert adata.obs["cell_type"].value_counts().tolist() == [7, 7]
    assert adata.uns["latentcell"]["source"] == "onnx"


def test_predict_without_torch(env, runs, bundles, tmp_path):
    cells = ad.read_h5ad(runs.store.parent / "cells.h5ad")
    test = cells[split_source_rows(runs.st, runs.store)["test"]]
    controls = tmp_path / "controls.h5ad"
    test.write_h5ad(controls)
    out = tmp_path / "pred.h5ad"
    runtime(env, "predict", "--bundle", bundles.st, "--controls", controls,
            "--perturbations", f"all,{runs.held}", "--unseen", "generic",
            "--cells-per-perturbation", 10, "--out", out)  # fmt: skip
    pred = ad.read_h5ad(out)
    predicted = pred.obs[pred.obs["source"] == "st"]
    assert runs.held in set(predicted["target_gene"])
    assert len(predicted) == 10 * 2 * predicted["target_gene"].nunique()  # x 2 cell types
    refused = runtime(env, "predict", "--bundle", bundles.st, "--controls", controls,
                      "--perturbations", runs.held, "--out", tmp_path / "no.h5ad", check=False)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
    assert "--unseen generic" in refused.stderr and not (tmp_path / "no.h5ad").exists()


def test_serve_without_torch(env, bundles):
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentcell.export.runtime", "serve", "--bundle", str(bundles.dit),
         "--port", "0", "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT"
        assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split()[-1]
        body = json.dumps({"n": 2, "conditions": {"cell_type": "*"}}).encode()
        request = urllib.request.Request(
            f"{url}/generate", body, {"Content-Type": "application/json"}
        )
        deadline = time.time() + 30
        reply = json.loads(urllib.request.urlopen(request, timeout=deadline - time.time()).read())
        assert np.asarray(reply["counts"]).shape == (4, len(reply["genes"]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
