"""MLflow tracking for the trainer: one MLflow run per training stage, logged from the main process.

Everything goes through ``MlflowClient`` with an explicit run id (no fluent active-run state, so
nothing leaks between stages or tests), and mlflow is imported lazily because ``import mlflow``
costs about 2 s. A tracking backend must never stop training: every failure becomes one
``RuntimeWarning`` per kind of operation and the tracker keeps going.

A backend that dies mid-run must not slow the run down nor leave it unclear what was lost.
After a failure the tracker is "down": it sends nothing for ``RETRY_S`` seconds, doubling
with each failure in a row up to ``MAX_RETRY_S`` (metrics stay buffered, up to
``MAX_PENDING``), then tries again. At the end of the run it tries once more (a forced flush)
and skips the artifact and model uploads if the backend is still down. It counts what never
arrived (metric steps and values, artifacts, the model, the params, tags and the dataset
input, a run it could not end, which MLflow then shows as RUNNING forever); :meth:`Tracker.lost`
returns that for ``summary.json`` and :meth:`Tracker.lost_line` says it in one line.

Nothing here reopens a run with ``mlflow.start_run``: its exit stamps a new end time (a 49 s
run showed 9.2 min after an export) and marks it FINISHED. Models are logged with
:func:`log_model_to_run`, which links a LoggedModel to the run through the client.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from latentcell.data_pipelines.errors import LatentcellWarning

__all__ = [
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "default_uri",
    "flatten_config",
    "log_model_to_run",
    "make_tracker",
    "pip_requirements",
    "store_dataset",
]

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.x
MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
MAX_PENDING = 100_000  # metrics kept for a retry while the backend is failing
RETRY_S = 60.0  # after a failure, no call for this long; doubled per failure in a row,
MAX_RETRY_S = 1800.0  # up to this: a server that hangs (30 s per call) costs a few % of a run
_TRUNCATED = "...[truncated]"
_PERMANENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")  # MlflowException codes
_SKIPPED = ConnectionError("not tried: the backend failed less than RETRY_S ago")


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how a stage is tracked."""

    uri: str = ""  # "" -> sqlite:///<run root>/mlflow.db (resolved by the caller via default_uri)
    experiment: str = "latentcell"
    run_name: str = ""  # "" -> caller's stage name
    log_every: int = 50  # steps between metric logs (the loop uses this)
    flush_every: int = 10  # buffered log_metrics calls per flush (one log_batch call)
    enabled: bool = True
    log_model: bool = True


def default_uri(run_root: Path) -> str:
    """SQLite store beside the run's outputs (MLflow 3's file store is in maintenance mode)."""
    return "sqlite:///" + str((Path(run_root) / "mlflow.db").resolve())


def flatten_config(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat ``{"a.b": "1"}`` params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
    return out


def pip_requirements() -> list[str]:
    """Exact pins for logged models, so MLflow need not spend ~10 s inferring them."""
    pins = []
    for pkg in ("torch", "numpy", "latentcell", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{pkg}=={metadata.version(pkg)}")
    return pins


def log_model_to_run(client, run_id: str, name: str, log, step: int = 0, tags=None):
    """``log(model_id=..., run_id=...)`` (a flavor's ``log_model`` or ``Model.log``) as a
    LoggedModel of ``run_id``: its source run, listed in the run's outputs at ``step`` with
    the run's metrics of that step, its params the run's. Created through the client in the
    run's experiment, so the run's status and end time stay as they are (``start_run`` would
    change both) and no fluent run or experiment is involved. A failed log leaves no model."""
    from mlflow.tracking.context.registry import resolve_tags

    run = client.get_run(run_id)
    tags = resolve_tags({k: str(v) for k, v in (tags or {}).items()})  # user, source: as fluent
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params),
        tags=tags,
    )  # fmt: skip
    try:
        return log(model_id=model.model_id, run_id=run_id, step=step)
    except BaseException:
        with contextlib.suppress(Exception):
            client.delete_logged_model(model.model_id)
        raise


def store_dataset(path: str | os.PathLike) -> dict:
    """A store as an MLflow dataset input: named after its directory, its digest the start of
    the manifest's own sha256 (the same store is one dataset across runs), its source the
    path, its profile the sizes and the whole manifest hash, its schema the obs columns."""
    from latentcell.data_pipelines.integrity import SEAL_KEY, manifest_digest
    from latentcell.data_pipelines.store_common import read_manifest

    path = Path(path).resolve()
    manifest = read_manifest(path)
    sha = manifest.get(SEAL_KEY) or manifest_digest(manifest)
    obs = manifest.get("obs") or {}
    columns = [(c, "string") for c in obs.get("categorical", {})]
    columns += [(c, "double") for c in obs.get("numeric", {})]
    return {
        "name": path.name,
        "digest": sha[:12],
        "source": str(path),
        "profile": {
            "n_cells": manifest.get("n_cells"),
            "n_genes": manifest.get("n_genes"),
            "nnz": manifest.get("nnz"),
            "format": manifest.get("format"),
            "manifest_sha256": sha,
            "roles": manifest.get("roles"),
        },  # fmt: skip
        "columns": columns,
    }


def _dataset_input(dataset: Mapping, context: str):
    """``store_dataset``'s dict -> an ``mlflow.entities.DatasetInput`` tagged with its context,
    in the form ``mlflow.data``'s MetaDataset of a local source writes (source type "local",
    ``{"uri": path}``, an ``mlflow_colspec`` schema), without its ambiguous-source warning."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    columns = [ColSpec(t, c) for c, t in dataset["columns"]]
    schema = json.dumps({"mlflow_colspec": Schema(columns).to_dict()}) if columns else None
    entity = Dataset(dataset["name"], dataset["digest"], "local",
                     json.dumps({"uri": dataset["source"]}), schema,
                     json.dumps(dataset["profile"]))  # fmt: skip
    return DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the DB (MLflow's default is ./mlruns in the CWD)."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(unquote(uri[len("sqlite:///") :])).resolve().parent / "mlartifacts")


def _key(name: str) -> str:
    """A name MLflow accepts: it rejects e.g. "val/loss (nb)" and the whole batch with it."""
    key = re.sub(r"[^/\w.\- :]", "_", str(name))
    key = "/".join(part for part in key.split("/") if part not in ("", ".", ".."))
    return (key or "_")[:250]


def _truncate(value: str) -> str:
    return (
        value
        if len(value) <= MAX_PARAM_VALUE
        else value[: MAX_PARAM_VALUE - len(_TRUNCATED)] + _TRUNCATED
    )


class TrackingWarning(LatentcellWarning, RuntimeWarning):
    """The tracking backend failed; training goes on (shown on the console by default)."""


class Tracker:
    """Main-process MLflow logger that never raises (one RuntimeWarning per failing kind)."""

    def __init__(self, config: TrackingConfig, uri: str):
        self.config = config
        self.uri = uri or config.uri
        if self.uri.startswith(("http://", "https://")):
            # MLflow's default 7 retries with backoff block ~4 min per call on a dead server;
            # unsent metrics stay buffered for the next flush anyway. Explicit settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self._client: Any = None
        self._run_id: str | None = None
        self._ended = False
        self._pending: list[Any] = []  # mlflow.entities.Metric
        self._calls = 0
        self._keys: dict[str, str] = {}
        self._warned: set[str] = set()
        self._retry_at: float | None = None  # set while the backend is down
        self._failures = 0  # in a row
        self._start_failed = False
        self._sent_steps: set[int] = set()
        self._lost_steps: set[int] = set()
        self._lost_metrics = 0
        self._lost_artifacts: list[str] = []
        self._lost_params = False
        self._lost_records: list[str] = []  # tags and dataset inputs
        self._not_ended = False

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def _warn(self, kind: str, exc: BaseException | str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"MLflow tracking at {self.uri!r}: {kind} failed ({str(detail)[:400]}); "
            "training continues",
            TrackingWarning,
            stacklevel=3,
        )

    @property
    def _active(self) -> bool:
        return self._run_id is not None and not self._ended

    def _call(self, kind: str, fn, force: bool = False) -> BaseException | None:
        """Run one backend call: None if it worked, else the error (warned once per kind)
        or ``_SKIPPED`` while the backend is down. An error a retry cannot fix (an invalid
        value, a deleted run) does not mark the backend down."""
        if self._retry_at is not None and not force and time.monotonic() < self._retry_at:
            return _SKIPPED
        try:
            fn()
        except Exception as exc:
            self._warn(kind, exc)
            if getattr(exc, "error_code", "") not in _PERMANENT:
                self._failures += 1
                wait = min(RETRY_S * 2 ** (self._failures - 1), MAX_RETRY_S)
                self._retry_at = time.monotonic() + wait
            return exc
        self._retry_at, self._failures = None, 0
        return None

    def _lose(self, metrics) -> None:
        for m in metrics:
            self._lost_steps.add(int(m.step))
        self._lost_metrics += len(metrics)

    def start(
        self,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Create (or with ``resume_run_id`` reopen) the run and log its params; None on failure."""
        try:
            from mlflow.tracking import MlflowClient

            self._client = client = MlflowClient(self.uri)
            if resume_run_id:
                try:
                    client.update_run(resume_run_id, status="RUNNING")
                    self._run_id = resume_run_id
                    if tags:
                        self._log_batch(tags=tags)
                except Exception as exc:  # the old run is gone: start a fresh one
                    self._warn("resume", exc)
            if self._run_id is None:
                exp = client.get_experiment_by_name(self.config.experiment)
                if exp is None:
                    exp_id = client.create_experiment(
                        self.config.experiment, artifact_location=_artifact_location(self.uri)
                    )
                else:
                    exp_id = exp.experiment_id
                    if exp.lifecycle_stage == "deleted":
                        client.restore_experiment(exp_id)
                run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
                self._run_id = run.info.run_id
        except Exception as exc:
            self._warn("start", exc)
            self._start_failed = True
            self._retry_at = time.monotonic() + RETRY_S
            return None
        self._log_params(params, reopened=self._run_id == resume_run_id)
        return self._run_id

    def _log_batch(self, metrics=(), params: Mapping | None = None, tags: Mapping | None = None):
        from mlflow.entities import Param, RunTag

        self._client.log_batch(
            self._run_id,
            metrics=list(metrics),
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def _log_params(self, params: Mapping[str, str], reopened: bool) -> None:
        """Params in chunks of 100; a reopened run only gets keys it does not have yet."""
        todo = {_key(k): _truncate(str(v)) for k, v in params.items()}
        try:
            if reopened:
                old = self._client.get_run(self._run_id).data.params
                changed = sorted(k for k, v in todo.items() if k in old and old[k] != v)
                if changed:  # MLflow rejects changing a param value; keep the first ones
                    self._warn("resume params", f"values changed, kept the old ones: {changed}")
                todo = {k: v for k, v in todo.items() if k not in old}
            items = list(todo.items())
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self._log_batch(params=dict(items[i : i + MAX_PARAMS_PER_BATCH]))
        except Exception as exc:
            self._warn("log_params", exc)
            self._lost_params = True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer; one flush every ``flush_every`` calls (over HTTP each call costs ~60 ms)."""
        if self._start_failed:  # nothing of this run reaches MLflow: count it
            self._lost_steps.add(int(step))
            self._lost_metrics += len(metrics)
            return
        if not self._active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            try:  # NaN/inf are accepted (SQLite stores inf as +-1.8e308)
                if key not in self._keys:
                    self._keys[key] = _key(key)
                self._pending.append(Metric(self._keys[key], float(value), now, int(step)))
            except (TypeError, ValueError) as exc:
                self._warn("metric value", exc)
        self._calls += 1
        if self._calls >= self.config.flush_every or len(self._pending) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Send buffered metrics, one log_batch per 1000; on failure keep them for a retry
        (the oldest beyond ``MAX_PENDING`` are dropped and counted as lost)."""
        self._calls = 0
        if not self._active:
            return
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            error = self._call("flush", lambda chunk=chunk: self._log_batch(metrics=chunk), force)
            if error is None:
                self._sent_steps.update(int(m.step) for m in chunk)
            elif getattr(error, "error_code", "") in _PERMANENT:
                self._lose(chunk)  # a retry cannot succeed
            else:
                overflow = max(0, len(self._pending) - MAX_PENDING)
                self._lose(self._pending[:overflow])
                del self._pending[:overflow]
                return
            del self._pending[: len(chunk)]

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self._active:
            if self._start_failed:
                self._lost_artifacts.append(_artifact_name(path, artifact_path))
            return

        def upload():
            if Path(path).is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)

        if self._call("log_artifact", upload) is not None:
            self._lost_artifacts.append(_artifact_name(path, artifact_path))

    def log_dict(self, d: Mapping, artifact_file: str) -> None:
        """JSON or YAML text artifact, chosen by the file extension."""
        if not self._active:
            if self._start_failed:
                self._lost_artifacts.append(artifact_file)
            return

        def upload():
            self._client.log_dict(self._run_id, dict(d), artifact_file)

        if self._call("log_dict", upload) is not None:
            self._lost_artifacts.append(artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Run tags (values as text), in one batch; a resumed run's tags are overwritten."""
        todo = {_key(k): _truncate(str(v)) for k, v in tags.items()}
        if not todo or not (self._active or self._start_failed):
            return
        if self._start_failed or self._call("set_tags", lambda: self._log_batch(tags=todo)):
            self._lost_records += [f"tag {k}" for k in todo]

    def log_dataset(self, path: str | os.PathLike | None, context: str = "training") -> None:
        """The store at ``path`` as the run's dataset input (``store_dataset``); logging it
        again (a resume) adds nothing. A store whose manifest cannot be read only warns."""
        if path is None or not (self._active or self._start_failed):
            return
        try:
            dataset = store_dataset(path)
        except Exception as exc:  # not the backend's fault: the backend stays up
            self._warn("dataset description", exc)
            return
        name = f"dataset {dataset['name']}"
        if self._start_failed:
            self._lost_records.append(name)
            return

        def send():
            self._client.log_inputs(self._run_id, datasets=[_dataset_input(dataset, context)])

        if self._call("log_dataset", send) is not None:
            self._lost_records.append(name)

    def log_model(
        self,
        module: Any,
        name: str,
        input_example: Any,
        pip_requirements: list[str],
        step: int = 0,
    ) -> str | None:
        """Log ``module`` as an MLflow model (a LoggedModel of this run, ``log_model_to_run``,
        with the run's metrics at ``step``); its URI or None. The default "pt2" format goes
        through ``torch.export`` with ``input_example`` (an array or a tuple of arrays, the
        forward's positional args); a module it cannot export is pickled instead, which needs
        latentcell at load time.
        """
        if not self.config.log_model:
            return None
        if not self._active or self._retry_at is not None:  # a dead backend: do not wait on it
            if self._start_failed or self._active:
                self._lost_artifacts.append(f"{name} (model)")
            return None
        import mlflow
        import mlflow.pytorch

        self.flush()
        previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets this
        kwargs = dict(
            name=name, input_example=input_example, pip_requirements=list(pip_requirements)
        )

        def log(fmt: str):
            return lambda **ids: mlflow.pytorch.log_model(module, serialization_format=fmt,
                                                          **kwargs, **ids)  # fmt: skip

        try:
            mlflow.set_tracking_uri(self.uri)  # the flavor saves through the fluent URI
            try:
                info = log_model_to_run(self._client, self._run_id, name, log("pt2"), step)
            except Exception as exc:
                self._warn("log_model pt2 export", f"{exc!r}; pickling instead")
                info = log_model_to_run(self._client, self._run_id, name, log("pickle"), step)
            return info.model_uri
        except Exception as exc:
            self._warn("log_model", exc)
            self._lost_artifacts.append(f"{name} (model)")
            return None
        finally:
            mlflow.set_tracking_uri(previous)

    def end(self, status: str = "FINISHED") -> None:
        """Flush, then mark the run terminated (tried even if the backend looked down: a run
        left RUNNING is worse than one more failed call); later calls are no-ops."""
        if not self._active:
            return
        self.flush()
        run_id = self._run_id
        failed = self._call("end", lambda: self._client.set_terminated(run_id, status), True)
        if failed is None and self._pending:  # the backend is back: send what waited
            self.flush()
        self._lose(self._pending)  # still unsent: they will never arrive
        self._pending.clear()
        self._ended = True
        self._not_ended = failed is not None

    def lost(self) -> dict[str, Any] | None:
        """What never reached MLflow (for summary.json), or None when nothing was lost."""
        if not (self._lost_metrics or self._lost_artifacts or self._lost_params
                or self._lost_records or self._not_ended or self._start_failed):  # fmt: skip
            return None
        report: dict[str, Any] = {
            "metric_steps": _ranges(sorted(self._lost_steps), self._sent_steps),
            "n_metrics": self._lost_metrics,
            "artifacts": list(self._lost_artifacts),
        }
        if self._lost_params:
            report["params"] = "not logged"
        if self._lost_records:
            report["records"] = list(self._lost_records)
        if self._start_failed:
            report["status"] = "not started"
        elif self._not_ended:
            report["status"] = "not ended"  # MLflow keeps showing the run as RUNNING
        return report

    def lost_line(self, run_dir: Path) -> str | None:
        """One console line naming what did not reach MLflow and where the local copies are."""
        lost = self.lost()
        if lost is None:
            return None
        parts = []
        if lost["n_metrics"]:
            steps = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in lost["metric_steps"])
            parts.append(f"{lost['n_metrics']} metric values (steps {steps})")
        if lost["artifacts"]:
            parts.append("artifacts " + ", ".join(lost["artifacts"]))
        if "params" in lost:
            parts.append("params")
        if lost.get("records"):
            parts.append(", ".join(lost["records"]))
        what = "; ".join(parts) or "nothing logged"
        status = {"not started": "; no MLflow run was created",
                  "not ended": "; the run was not ended there (it stays RUNNING)"}  # fmt: skip
        return (
            f"MLflow at {self.uri} did not receive: {what}{status.get(lost.get('status'), '')}. "
            f"Local copies: {Path(run_dir) / 'metrics.jsonl'} and {run_dir} (summary.json "
            "lists what was lost)"
        )


def _artifact_name(path: Path, artifact_path: str | None) -> str:
    return f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name


def _ranges(lost: list[int], sent: set[int]) -> list[list[int]]:
    """Lost steps as [first, last] runs: a run breaks where a step in between did arrive."""
    out: list[list[int]] = []
    delivered = sorted(sent)
    for step in lost:
        if out:
            between = bisect.bisect_right(delivered, out[-1][1]) < bisect.bisect_left(
                delivered, step
            )
            if not between:
                out[-1][1] = step
                continue
        out.append([step, step])
    return out


class NullTracker(Tracker):
    """Does nothing (non-main processes, tracking disabled): a Tracker whose run never starts."""

    def __init__(self) -> None:
        super().__init__(TrackingConfig(enabled=False), "")

    def start(self, run_name, params, tags=None, resume_run_id=None) -> None:
        return None


def make_tracker(config: TrackingConfig, uri: str, is_main_process: bool) -> Tracker | NullTracker:
    """Only the main process talks to MLflow, so a DDP job logs exactly one run."""
    if not (is_main_process and config.enabled):
        return NullTracker()
    return Tracker(config, uri)
