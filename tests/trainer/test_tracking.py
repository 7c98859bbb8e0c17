"""Tracker against a real MLflow SQLite store (no mocks): batching, resume, failures, models."""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch

from latentcell.trainer.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    default_uri,
    flatten_config,
    make_tracker,
    pip_requirements,
)

# SQLAlchemy 2.1 deprecates a loader MLflow 3.17 still configures; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module: creating a SQLite store costs ~2.5 s."""
    return default_uri(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_flatten_default_uri_and_pins(tmp_path):
    flat = flatten_config({"a": {"b": 1, "c": [1, 2]}, "d": (3,), "e": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "[3]", "e": "None"}
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    pins = pip_requirements()
    assert [p.split("==")[0] for p in pins] == ["torch", "numpy", "latentcell", "mlflow"]
    assert f"torch=={torch.__version__}" in pins


def test_params_batched_metrics_artifacts(uri, client, tmp_path):
    tracker = Tracker(TrackingConfig(experiment="t", flush_every=10), uri)
    params = {f"p{i:03d}": str(i) for i in range(150)} | {"long": "x" * 7000}
    run_id = tracker.start("stage1", params, tags={"stage": "vae"})
    assert run_id == tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "stage1"
    assert run.data.tags["stage"] == "vae"
    assert len(run.data.params) == 151 and run.data.params["p149"] == "149"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("[truncated]")

    for step in range(9):  # buffered: nothing reaches the store before the 10th call
        tracker.log_metrics({"loss": 1.0 / (step + 1), "val/loss (nb)": float(step)}, step)
    assert _steps(client, run_id, "loss") == []
    tracker.log_metrics({"loss": 0.1, "val/loss (nb)": 9.0}, 9)  # 10th call: one flush
    assert [s for s, _ in _steps(client, run_id, "loss")] == list(range(10))
    assert len(_steps(client, run_id, "val/loss _nb_")) == 10  # key made valid, not dropped
    tracker.log_metrics({"grad": math.nan, "big": math.inf}, 10)
    tracker.log_metrics({f"w{i}": float(i) for i in range(2500)}, 11)  # > 1000: chunked
    tracker.flush()
    metrics = client.get_run(run_id).data.metrics
    assert len([k for k in metrics if k.startswith("w")]) == 2500
    assert math.isnan(metrics["grad"]) and metrics["big"] > 1e300

    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt", "extra")
    tracker.log_dict({"a": 1, "b": [1, 2]}, "config.yaml")
    tracker.log_metrics({"loss": 0.05}, 12)  # buffered until end()
    tracker.end()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(_steps(client, run_id, "loss")) == 11
    paths = {a.path for a in client.list_artifacts(run_id)}
    assert paths == {"extra", "config.yaml"}
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]
    tracker.log_metrics({"loss": 1.0}, 13)  # after end: a no-op, not an error
    tracker.end()


def test_resume_continues_the_same_run(uri, client):
    config = TrackingConfig(experiment="t", flush_every=100)
    first = Tracker(config, uri)
    run_id = first.start("stage1", {"lr": "0.001", "epochs": "2"})
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step)
    first.flush()  # the process dies here: no end()
    assert client.get_run(run_id).info.status == "RUNNING"
    first.end("KILLED")  # or it was marked killed; resume must reopen it either way
    assert client.get_run(run_id).info.status == "KILLED"

    second = Tracker(config, uri)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # identical params re-logged must not warn or fail
        resumed = second.start(
            "stage1", {"lr": "0.001", "epochs": "2", "resumed_from": "4"}, resume_run_id=run_id
        )
    assert resumed == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step)
    second.end()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "epochs": "2", "resumed_from": "4"}
    assert [s for s, _ in _steps(client, run_id, "loss")] == list(range(10))

    third = Tracker(config, uri)  # a changed value cannot be re-logged: keep the old one, warn
    with pytest.warns(RuntimeWarning, match="values changed"):
        third.start("stage1", {"lr": "0.01"}, resume_run_id=run_id)
    third.end()
    assert client.get_run(run_id).data.params["lr"] == "0.001"


def _exercise(tracker, tmp_path):
    """Every call the loop makes; none may raise."""
    tracker.start("s", {"a": "1"})
    for step in range(25):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.flush()
    (tmp_path / "f.txt").write_text("x")
    tracker.log_artifact(tmp_path / "f.txt")
    tracker.log_dict({"a": 1}, "c.json")
    tracker.end()


def test_unusable_sqlite_path_warns_once_and_never_raises(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    tracker = Tracker(TrackingConfig(flush_every=2), f"sqlite:///{tmp_path}/file/x/mlflow.db")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _exercise(tracker, tmp_path)
    assert tracker.run_id is None
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "file/x/mlflow.db" in str(caught[0].message) and "start" in str(caught[0].message)


def test_dead_http_server_is_fast_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(TrackingConfig(), f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=f"127.0.0.1:{port}"):
        _exercise(tracker, tmp_path)
    assert time.perf_counter() - t0 < 5


def test_backend_failure_mid_run_warns_once_per_kind(uri, client, tmp_path):
    tracker = Tracker(TrackingConfig(experiment="t", flush_every=1), uri)
    run_id = tracker.start("s", {})
    client.delete_run(run_id)  # from now on every write is rejected by the store
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step)
        tracker.log_dict({"a": 1}, "c.json")
        tracker.end()
    kinds = [str(w.message).split(": ")[1].split(" failed")[0] for w in caught]
    assert sorted(kinds) == sorted(set(kinds)) and "flush" in kinds
    assert all(issubclass(w.category, RuntimeWarning) for w in caught)
    assert tracker._pending == []  # rejected batches are not retried forever


def test_log_model_round_trip_keeps_run_running(uri, client):
    import mlflow.pytorch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = np.random.default_rng(0).random((4, 3), dtype=np.float32)
    pins = pip_requirements()
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    tracker = Tracker(TrackingConfig(experiment="t"), uri)
    run_id = tracker.start("s", {"a": "1"})
    tracker.log_metrics({"loss": 0.5}, 7)

    t0 = time.perf_counter()
    model_uri = tracker.log_model(model, "model", x, pins, step=7)
    elapsed = time.perf_counter() - t0
    assert model_uri is not None, "log_model failed (see warnings)"
    assert elapsed < 10, f"log_model took {elapsed:.1f} s"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.end_time is None  # not reopened or ended
    assert mlflow.active_run() is None
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before

    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.experiment_id == run.info.experiment_id
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 7)]
    assert {(m.key, m.value) for m in logged.metrics} == {("loss", 0.5)}  # the run's at step 7
    assert logged.params == {"a": "1"}
    folder = logged.artifact_location.removeprefix("file://")
    with open(os.path.join(folder, "requirements.txt")) as fh:
        assert fh.read().split() == pins
    loaded = mlflow.pytorch.load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(x)), model(torch.from_numpy(x)))
    tracker.end()
    assert client.get_run(run_id).info.status == "FINISHED"


class _DataDependent(torch.nn.Module):
    """Branches on a tensor value, which torch.export cannot trace."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_log_model_falls_back_to_pickle(uri):
    import mlflow.pytorch

    model = _DataDependent()
    x = np.ones((4, 3), dtype=np.float32)
    tracker = Tracker(TrackingConfig(experiment="t"), uri)
    tracker.start("s", {})
    with pytest.warns(RuntimeWarning, match="pt2 export"):
        model_uri = tracker.log_model(model, "model", x, pip_requirements())
    assert model_uri is not None
    folder = tracker._client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    loaded = mlflow.pytorch.load_model(folder.removeprefix("file://"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(x)), model(torch.from_numpy(x)))
    tracker.end()


def test_logging_a_model_to_a_finished_run_keeps_its_status_and_end_time(uri, client):
    """What `latentcell export` does to the training run: a LoggedModel, nothing else."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from latentcell.trainer.tracking import log_model_to_run

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    tracker = Tracker(TrackingConfig(experiment="t"), uri)
    run_id = tracker.start("s", {"a": "1"})
    tracker.end()
    before = client.get_run(run_id).info
    time.sleep(0.05)  # a new end time would differ
    mlflow.set_tracking_uri(uri)
    try:
        info = log_model_to_run(
            client, run_id, "echo",
            lambda **ids: Model.log(None, name="echo", flavor=mlflow.pyfunc, python_model=Echo(),
                                    pip_requirements=["numpy"], **ids),
            tags={"latentcell.kind": "test"},
        )  # fmt: skip
    finally:
        mlflow.set_tracking_uri(None)
    after = client.get_run(run_id).info
    assert (after.status, after.end_time, after.start_time) == (
        "FINISHED",
        before.end_time,
        before.start_time,
    )
    logged = client.get_logged_model(info.model_id)
    assert logged.source_run_id == run_id and logged.tags["latentcell.kind"] == "test"
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")


def test_failed_model_log_leaves_no_logged_model(uri, client):
    from latentcell.trainer.tracking import log_model_to_run

    tracker = Tracker(TrackingConfig(experiment="t-failed"), uri)
    run_id = tracker.start("s", {})

    def broken(**ids):
        raise RuntimeError("flavor failed")

    with pytest.raises(RuntimeError, match="flavor failed"):
        log_model_to_run(client, run_id, "m", broken)
    experiment = client.get_run(run_id).info.experiment_id
    assert client.search_logged_models(experiment_ids=[experiment]) == []
    tracker.end()


def test_dataset_input_and_summary_tags(uri, client, small_store):
    tracker = Tracker(TrackingConfig(experiment="t"), uri)
    run_id = tracker.start("s", {})
    tracker.log_dataset(small_store)
    tracker.set_tags({"check/ratio": "0.93", "data/skipped_units": 0})
    tracker.end()
    resumed = Tracker(TrackingConfig(experiment="t"), uri)  # a resume logs it again: no copy
    resumed.start("s", {}, resume_run_id=run_id)
    resumed.log_dataset(small_store)
    resumed.set_tags({"check/ratio": "0.95"})  # tags, unlike params, take the new value
    resumed.end()

    run = client.get_run(run_id)
    assert {k: run.data.tags[k] for k in ("check/ratio", "data/skipped_units")} == {
        "check/ratio": "0.95",
        "data/skipped_units": "0",
    }
    (item,) = run.inputs.dataset_inputs
    manifest = json.loads((small_store / "manifest.json").read_text())
    dataset = item.dataset
    assert dataset.name == small_store.name and dataset.source_type == "local"
    assert json.loads(dataset.source) == {"uri": str(small_store.resolve())}
    assert dataset.digest == manifest["manifest_sha256"][:12]
    profile = json.loads(dataset.profile)
    assert (profile["n_cells"], profile["n_genes"]) == (manifest["n_cells"], manifest["n_genes"])
    assert profile["manifest_sha256"] == manifest["manifest_sha256"]
    columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert set(manifest["obs"]["categorical"]) <= columns
    assert [(t.key, t.value) for t in item.tags] == [("mlflow.data.context", "training")]


def test_a_store_without_manifest_only_warns(uri, tmp_path):
    tracker = Tracker(TrackingConfig(experiment="t"), uri)
    tracker.start("s", {})
    with pytest.warns(RuntimeWarning, match="dataset description"):
        tracker.log_dataset(tmp_path)  # a directory, not a store
    tracker.log_metrics({"loss": 1.0}, 1)  # the backend was not marked down
    assert tracker._retry_at is None
    tracker.end()
    assert tracker.lost() is None


def test_null_tracker_and_make_tracker(uri, tmp_path):
    assert isinstance(make_tracker(TrackingConfig(), uri, is_main_process=False), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(enabled=False), uri, True), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(), uri, True), Tracker)
    null = NullTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _exercise(null, tmp_path)
        assert null.log_model(torch.nn.Linear(1, 1), "m", np.zeros((1, 1)), []) is None
        null.log_dataset(tmp_path)
        null.set_tags({"a": 1})
    assert null.run_id is None


def test_lost_steps_are_ranges_broken_by_delivered_ones():
    from latentcell.trainer.tracking import _ranges

    assert _ranges([], set()) == []
    assert _ranges([10, 20, 30], {0, 5}) == [[10, 30]]
    assert _ranges([10, 20, 40, 50], {30}) == [[10, 20], [40, 50]]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on loopback (SQLite store, job runner off: about 6 s)."""
    import shutil
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    exe = Path(sys.executable).with_name("mlflow")
    if not exe.exists() and shutil.which("mlflow") is None:
        pytest.skip("no mlflow server command")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(exe if exe.exists() else shutil.which("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{db}", "--default-artifact-root", str(db.parent / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.2)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    yield uri, db, stop
    stop()


def test_a_server_dying_mid_run_is_reported_and_costs_no_time(
    mlflow_server, tmp_path, capsys, monkeypatch
):
    """Training finishes; summary.json and one console line say which metric steps and
    artifacts never reached MLflow, and that the run stays RUNNING there."""
    import json

    from mlflow.tracking import MlflowClient

    from latentcell.trainer.config import load_config
    from latentcell.trainer.loop import fit
    from tests.trainer.toy_stage import ToyRunConfig, ToyStage

    uri, db, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the tracker's own defaults,
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # restored after the test
    run_dir = tmp_path / "run" / "toy"
    config = load_config(ToyRunConfig, None, [
        f"run.dir={run_dir}", "train.progress=false", "train.max_steps=30",
        "train.checkpoint_every=10", "train.eval_every=0", "tracking.enabled=true",
        f"tracking.uri={uri}", "tracking.log_every=2", "tracking.flush_every=1",
    ])  # fmt: skip
    killed_at: list[float] = []

    def kill(batches: int) -> None:
        if batches == 12:  # metrics of steps 2..12 have been sent
            stop()
            killed_at.append(time.perf_counter())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = fit(ToyStage(config, on_batch=kill), config)
    after_kill = time.perf_counter() - killed_at[0]
    assert result.step == 30
    assert after_kill < 60, f"a dead server cost {after_kill:.0f} s"

    lost = json.loads((run_dir / "summary.json").read_text())["mlflow"]["lost"]
    first, last = lost["metric_steps"][0][0], lost["metric_steps"][-1][1]
    assert 12 <= first <= 14 and last == 30 and len(lost["metric_steps"]) == 1
    assert lost["n_metrics"] > 0
    assert lost["artifacts"] == ["config.toml", "summary.json", "model_card/model_config.json",
                                 "figures/training_curves.png", "model (model)"]  # fmt: skip
    assert lost["status"] == "not ended"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("MLflow at")]
    assert len(lines) == 1
    assert lines[0].startswith(f"MLflow at {uri} did not receive: {lost['n_metrics']} metric "
                               f"values (steps {first}-30); artifacts config.toml")  # fmt: skip
    assert "it stays RUNNING" in lines[0] and str(run_dir / "metrics.jsonl") in lines[0]

    store = MlflowClient(f"sqlite:///{db}")  # what the server had stored before it died
    run = store.get_run(result.mlflow_run_id)
    assert run.info.status == "RUNNING"
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(2, first, 2))
    local = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(local)) == list(range(2, 31, 2))  # the local copy has every step
