"""The HTTP service over localhost: health, generate and predict as JSON, and clear 400s."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from latentcell.export.runtime import Bundle
from latentcell.export.runtime.service import make_server


@pytest.fixture
def server(request):
    servers = []

    def start(bundle_dir):
        server = make_server(Bundle.load(bundle_dir, threads=1), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def call(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_generate_over_http(server, bundles):
    url = server(bundles.dit)
    assert url.startswith("http://127.0.0.1:")
    status, health = call(url, "/health")
    assert status == 200 and health["kind"] == "generation" and health["mlflow_run_id"]
    status, reply = call(url, "/generate", {"n": 3, "conditions": {"cell_type": "*"}, "seed": 5})
    assert status == 200
    counts = np.asarray(reply["counts"])
    assert counts.shape == (6, len(reply["genes"])) and counts.sum() > 0
    assert sorted(set(reply["obs"]["cell_type"])) == sorted(
        bundles.meta["dit"]["generation"]["conditions"]["categories"]["cell_type"]
    )
    assert call(url, "/generate", {"n": 3, "conditions": {"cell_type": "*"}, "seed": 5})[1] == reply
    status, error = call(url, "/generate", {"n": 2, "conditions": {"cell_type": "neuron"}})
    assert status == 400 and "unknown label" in error["error"]
    assert call(url, "/generate", {"n": 0})[0] == 400
    assert call(url, "/predict", {"controls": {"counts": [[1]]}})[0] == 400  # not an ST bundle
    assert call(url, "/nowhere")[0] == 404


def test_predict_over_http(server, runs, bundles):
    url = server(bundles.st)
    _, genes = call(url, "/genes")
    keys = genes["gene_key"]
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (5, len(keys)))
    body = {"controls": {"counts": counts.tolist(), "cell_type": "type_0"},
            "perturbations": [runs.held], "unseen": "generic"}  # fmt: skip
    cell_types = bundles.meta["st"]["prediction"]["cell_types"]
    body["controls"]["cell_type"] = cell_types[0]
    status, reply = call(url, "/predict", body)
    assert status == 200 and np.asarray(reply["predictions"][runs.held]).shape == counts.shape
    # genes named in another order: reordered to the model's
    order = rng.permutation(len(keys))
    shuffled = dict(body, controls=dict(body["controls"], counts=counts[:, order].tolist(),
                                        genes=[keys[i] for i in order]))  # fmt: skip
    assert call(url, "/predict", shuffled)[1] == reply
    status, error = call(
        url, "/predict", dict(body, controls=dict(body["controls"], counts=counts[:, 1:].tolist()))
    )
    assert status == 400 and "columns" in error["error"]
    missing = dict(
        body, controls=dict(body["controls"], counts=counts[:, 1:].tolist(), genes=keys[1:])
    )
    status, error = call(url, "/predict", missing)
    assert status == 400 and "missing" in error["error"]
    status, error = call(url, "/predict", dict(body, unseen="error"))
    assert status == 400 and "generic" in error["error"]
