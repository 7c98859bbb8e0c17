"""``latentcell export`` as a user runs it: the bundle, logged as artifacts of the run's MLflow
run, registered as a model that loads with ``mlflow.pyfunc`` and generates; bad input exits
2 with one ``error:`` line and writes nothing."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from latentcell.launch.cli import main


def test_export_logs_and_registers_the_bundle(runs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                "--run",
                str(runs.dit),
                "--out",
                str(out),
                "--register",
                "tiny-dit",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "generation" and (out / "metadata.json").exists()
    logged = summary["mlflow"]
    run_summary = json.loads((runs.dit / "summary.json").read_text())["mlflow"]
    assert logged["run_id"] == run_summary["run_id"]
    client = MlflowClient(run_summary["tracking_uri"])
    artifacts = {a.path for a in client.list_artifacts(logged["run_id"], "onnx_bundle")}
    assert {"onnx_bundle/metadata.json", "onnx_bundle/denoiser.onnx"} <= artifacts
    assert logged["registered"] == {"name": "tiny-dit", "version": 1}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(run_summary["tracking_uri"])
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-dit/1")
    finally:
        mlflow.set_tracking_uri(previous)
    reply = model.predict({"n": 2, "conditions": {"cell_type": "*"}})
    assert len(reply["counts"]) == 4 and len(reply["counts"][0]) == len(reply["genes"])


@pytest.mark.parametrize(
    "extra, named",
    [(["--opset", "17"], "--opset"), (["--register", "x", "--no-mlflow"], "--register")],
)
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, capsys, extra, named):
    out = tmp_path / "bundle"
    assert main(["export", "--run", str(runs.vae), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and named in err and not out.exists()


def test_existing_bundle_is_kept_without_overwrite(runs, bundles, capsys):
    before = (bundles.vae / "metadata.json").read_text()
    assert main(["export", "--run", str(runs.vae), "--out", str(bundles.vae), "--no-mlflow"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (bundles.vae / "metadata.json").read_text() == before
