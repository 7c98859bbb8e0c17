"""Logging a bundle to MLflow against the training run's real SQLite store: the training run
keeps its status and end time, the model is a LoggedModel of it with an input example the
bundle answers, and a registered version says what it is (description, tags, signature)."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from latentcell.export.mlflow_model import TAG, log_bundle

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _load(uri: str, model_uri: str):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        local = mlflow.artifacts.download_artifacts(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    info = mlflow.models.Model.load(local)
    return model, info, info.load_input_example(local)


def test_export_keeps_the_training_run_and_describes_the_registered_model(bundles):
    meta = bundles.meta["dit"]
    run_id, uri = meta["source"]["mlflow_run_id"], meta["source"]["tracking_uri"]
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    assert before.status == "FINISHED" and before.end_time is not None

    logged = log_bundle(bundles.dit, meta, register="described-dit")

    after = client.get_run(run_id)
    assert (after.info.status, after.info.start_time, after.info.end_time) == (
        "FINISHED", before.start_time, before.end_time,
    )  # fmt: skip
    files = {a.path for a in client.list_artifacts(run_id, "onnx_bundle")}
    assert {"onnx_bundle/metadata.json", "onnx_bundle/denoiser.onnx"} <= files
    model_id = logged["model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == run_id
    assert model_id in {o.model_id for o in after.outputs.model_outputs}

    version = client.get_model_version("described-dit", str(logged["registered"]["version"]))
    tags = version.tags
    assert tags[TAG + "family"] == "dit" and tags[TAG + "kind"] == "generation"
    assert int(tags[TAG + "n_genes"]) == len(meta["genes"]["gene_key"])
    assert tags[TAG + "source_run_id"] == run_id
    assert tags[TAG + "bundle_format_version"] == str(meta["format_version"])
    conditions = json.loads(tags[TAG + "conditions"])
    assert conditions == {k: len(v) for k, v in
                          meta["generation"]["conditions"]["categories"].items()}  # fmt: skip
    assert (
        run_id in version.description and f"Genes: {tags[TAG + 'n_genes']}" in version.description
    )
    registered = client.get_registered_model("described-dit")
    assert registered.description.startswith("latentcell dit model, a generation bundle")
    assert registered.tags == {TAG + "family": "dit", TAG + "kind": "generation"}

    model, info, example = _load(uri, "models:/described-dit/1")
    assert [c.name for c in info.signature.outputs.inputs] == ["genes", "obs", "counts"]
    assert info.signature.inputs is None  # requests are not forced through a DataFrame
    assert example["n"] == 2 and example["steps"] == 2
    reply = model.predict(example)  # the example is a request the bundle answers
    assert len(reply["counts"]) == 2 and len(reply["counts"][0]) == len(reply["genes"])


def test_a_prediction_bundle_logs_an_example_it_answers(bundles):
    meta = bundles.meta["st"]
    run_id, uri = meta["source"]["mlflow_run_id"], meta["source"]["tracking_uri"]
    end_time = MlflowClient(uri).get_run(run_id).info.end_time
    logged = log_bundle(bundles.st, meta)
    assert MlflowClient(uri).get_run(run_id).info.end_time == end_time
    model, info, example = _load(uri, logged["model_uri"])
    assert [c.name for c in info.signature.outputs.inputs] == ["genes", "predictions"]
    reply = model.predict(example)
    assert set(reply["predictions"]) == set(example["perturbations"])
    assert len(reply["predictions"][example["perturbations"][0]]) == 1  # one control cell
