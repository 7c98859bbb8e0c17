"""The runtime's commands where ``import torch`` fails: generate, predict and serve run from
a bundle in a fresh interpreter whose path starts with a ``torch`` package that raises
ImportError (so any import of torch, direct or through another module, breaks the run)."""

from __future__ import annotations

import json
import os
import signal
import socket
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
    h5ad files only; the runtime itself needs numpy and onnxruntime, and its HTTP service
    adds Starlette and uvicorn (imported by ``service`` and its ``http_limits`` alone, never
    by the runtime, nor by the request schema, which is checkable without HTTP)."""
    heavy = "('torch', 'anndata', 'pandas', 'scipy', 'h5py', 'mlflow')"
    web = "('starlette', 'uvicorn')"
    code = (f"import sys, latentcell.export.runtime; print([m for m in {heavy} + {web} "
            "if m in sys.modules]); import latentcell.export.runtime.request_schema; "
            f"print([m for m in {heavy} + {web} if m in sys.modules]); "
            "import latentcell.export.runtime.service; "
            f"print([m for m in {heavy} if m in sys.modules]); print([m for m in {web} "
            "if m in sys.modules])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["[]", "[]", "[]", "['starlette', 'uvicorn']"]


def test_generate_without_torch(env, bundles, tmp_path):
    out = tmp_path / "gen.h5ad"
    result = runtime(env, "generate", "--bundle", bundles.dit, "--n", 7,
                     "--condition", "cell_type=*", "--seed", 3, "--out", out, "--json")  # fmt: skip
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


def _raw(url: str, data: bytes) -> tuple[int, dict]:
    """One raw HTTP exchange (what urllib would refuse to send): status and JSON body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _serve(env, bundle, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentcell.export.runtime", "serve", "--bundle", str(bundle),
         "--port", "0", "--threads", "1", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT"
    if "http://127.0.0.1:" not in line:
        proc.kill()
        pytest.fail(f"no URL in {line!r}: {proc.communicate(timeout=10)[1][-2000:]}")
    return proc, line.split()[-1]


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM: uvicorn drains, then the process exits with status 0."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    return stderr


def test_serve_without_torch(env, bundles):
    proc, url = _serve(env, bundles.dit)
    try:
        body = json.dumps({"n": 2, "conditions": {"cell_type": "*"}}).encode()
        request = urllib.request.Request(
            f"{url}/generate", body, {"Content-Type": "application/json"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert np.asarray(reply["counts"]).shape == (4, len(reply["genes"]))
        status, error = _raw(url, b"POST /generate HTTP/1.1\r\nHost: t\r\nConnection: close"
                             b"\r\nContent-Length: 11\r\n\r\n{\"n\": true}")  # fmt: skip
        assert status == 400 and error["field"] == "n" and error["fix"]
        status, error = _raw(url, b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: abc"
                             b"\r\n\r\n")  # fmt: skip
        assert status == 400 and error["field"] == "request"
    except BaseException:
        proc.kill()
        raise
    stderr = _stop(proc)
    assert "Shutting down" in stderr and "Traceback" not in stderr


def test_serve_with_worker_processes(env, bundles):
    proc, url = _serve(env, bundles.st, "--workers", "2")
    try:
        deadline = time.time() + 60  # the workers load the bundle after the URL is printed
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        assert health["kind"] == "prediction"
        status, error = _raw(url, b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close"
                             b"\r\n\r\n")  # fmt: skip
        assert status == 404 and error["field"] == "path"
    except BaseException:
        proc.kill()
        raise
    _stop(proc)


def test_serve_refuses_bad_settings_in_one_line(env, bundles, tmp_path):
    for extra in (["--max-body-bytes", "0"], ["--workers", "0"]):
        result = runtime(env, "serve", "--bundle", bundles.dit, "--port", 0, *extra, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = runtime(env, "serve", "--bundle", tmp_path, "--port", 0, check=False)
    assert result.returncode == 2 and "not a bundle directory" in result.stderr


def test_predict_without_torch_routes_a_held_out_cell_type(env, held_type, runs, tmp_path):
    """The runtime's command: refused by default (one line, exit 2), routed with
    --unseen-cell-type unknown and reported in its summary and in the file."""
    cells = ad.read_h5ad(runs.store.parent / "cells.h5ad")
    controls = tmp_path / "held.h5ad"
    cells[(cells.obs["cell_type"] == held_type.held).to_numpy()].copy().write_h5ad(controls)
    label = next(x for x in held_type.meta["prediction"]["trained"] if x != "non-targeting")
    args = ("predict", "--bundle", held_type.bundle, "--controls", controls,
            "--perturbations", label, "--cells-per-perturbation", 5)  # fmt: skip
    refused = runtime(env, *args, "--out", tmp_path / "no.h5ad", check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
    assert "--unseen-cell-type unknown" in refused.stderr and len(refused.stderr.splitlines()) == 1
    done = runtime(
        env, *args, "--unseen-cell-type", "unknown", "--out", tmp_path / "p.h5ad", "--json"
    )
    assert json.loads(done.stdout)["fallbacks"] == {"cell_type": {held_type.held: "unknown"}}
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.uns["latentcell"]["fallbacks"]["cell_type"][held_type.held] == "unknown"


def test_predict_without_torch_takes_controls_without_a_cell_type_column(
    env, implicit_type, tmp_path
):
    """The README's Papalexi recipe: the store labelled the missing cell type, and the same
    file's controls (no cell-type column) predict through the runtime's command."""
    controls = tmp_path / "controls.h5ad"
    implicit_type.cells.write_h5ad(controls)
    out = tmp_path / "pred.h5ad"
    done = runtime(env, "predict", "--bundle", implicit_type.bundle, "--controls", controls,
                   "--perturbations", "all", "--cells-per-perturbation", 5, "--out", out, "--json")  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["n_perturbations"] == 3 and summary["fallbacks"] == {}
    assert "cell_type" not in ad.read_h5ad(out).obs
