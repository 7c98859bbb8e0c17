"""MLflow tracking for the trainer: one MLflow run per training stage, logged from the main process.

Everything goes through ``MlflowClient`` with an explicit run id (no fluent active-run state, so
nothing leaks between stages or tests), and mlflow is imported lazily because ``import mlflow``
costs about 2 s. A tracking backend must never stop training: every failure becomes one
``RuntimeWarning`` per kind of operation and the tracker keeps going.
"""

from __future__ import annotations

import contextlib
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

__all__ = [
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "default_uri",
    "flatten_config",
    "make_tracker",
    "pip_requirements",
]

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.x
MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
MAX_PENDING = 100_000  # metrics kept for a retry while the backend is failing
_TRUNCATED = "...[truncated]"
_PERMANENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")  # MlflowException codes


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
            RuntimeWarning,
            stacklevel=3,
        )

    @property
    def _active(self) -> bool:
        return self._run_id is not None and not self._ended

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

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer; one flush every ``flush_every`` calls (over HTTP each call costs ~60 ms)."""
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

    def flush(self) -> None:
        """Send buffered metrics, one log_batch per 1000; on failure keep them for a retry."""
        self._calls = 0
        if not self._active:
            return
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            try:
                self._log_batch(metrics=chunk)
            except Exception as exc:
                self._warn("flush", exc)
                if getattr(exc, "error_code", "") in _PERMANENT:  # a retry cannot succeed
                    del self._pending[: len(chunk)]
                    continue
                del self._pending[: max(0, len(self._pending) - MAX_PENDING)]
                return
            del self._pending[: len(chunk)]

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self._active:
            return
        try:
            if Path(path).is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)
        except Exception as exc:
            self._warn("log_artifact", exc)

    def log_dict(self, d: Mapping, artifact_file: str) -> None:
        """JSON or YAML text artifact, chosen by the file extension."""
        if not self._active:
            return
        try:
            self._client.log_dict(self._run_id, dict(d), artifact_file)
        except Exception as exc:
            self._warn("log_dict", exc)

    def log_model(
        self,
        module: Any,
        name: str,
        input_example: Any,
        pip_requirements: list[str],
        step: int = 0,
    ) -> str | None:
        """Log ``module`` as an MLflow model (a LoggedModel linked to this run); its URI or None.

        ``mlflow.pytorch.log_model`` only links to the fluent active run, so the run is pushed
        for the call and popped with ``end_run(status="RUNNING")`` (a plain ``with start_run``
        would mark it FINISHED). The default "pt2" format goes through ``torch.export`` with
        ``input_example`` (an array or a tuple of arrays, the forward's positional args); a
        module it cannot export is pickled instead, which needs latentcell at load time.
        """
        if not self._active or not self.config.log_model:
            return None
        import mlflow
        import mlflow.pytorch

        self.flush()
        previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets this
        try:
            mlflow.set_tracking_uri(self.uri)
            mlflow.start_run(run_id=self._run_id, nested=mlflow.active_run() is not None)
            try:
                kwargs = dict(name=name, input_example=input_example, step=step)
                kwargs["pip_requirements"] = list(pip_requirements)
                try:
                    info = mlflow.pytorch.log_model(module, serialization_format="pt2", **kwargs)
                except Exception as exc:
                    self._warn("log_model pt2 export", f"{exc!r}; pickling instead")
                    info = mlflow.pytorch.log_model(module, serialization_format="pickle", **kwargs)
            finally:
                mlflow.end_run(status="RUNNING")
            return info.model_uri
        except Exception as exc:
            self._warn("log_model", exc)
            return None
        finally:
            mlflow.set_tracking_uri(previous)

    def end(self, status: str = "FINISHED") -> None:
        """Flush, then mark the run terminated; later calls are no-ops."""
        if not self._active:
            return
        self.flush()
        self._ended = True
        try:
            self._client.set_terminated(self._run_id, status)
        except Exception as exc:
            self._warn("end", exc)


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
