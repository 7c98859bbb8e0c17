"""A bundle in MLflow: the files as artifacts of the run it came from, and a registrable
pyfunc model that serves it with the torch-free runtime.

``log_bundle`` puts the bundle under ``onnx_bundle/`` of the source run (the run id is in
the run's summary.json, copied into the bundle's metadata at export) and logs an
``onnx_model`` pyfunc whose only artifact is the bundle; ``register`` names it in the model
registry. ``mlflow.pyfunc.load_model("models:/NAME/1").predict(request)`` then takes the
same JSON requests as the HTTP service (``runtime/service.py``): ``{"n": .., "conditions":
{..}}`` to generate, ``{"controls": {..}, "perturbations": [..]}`` to predict.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import mlflow.pyfunc

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["BundlePyfunc", "log_bundle"]

ARTIFACT_PATH = "onnx_bundle"
MODEL_NAME = "onnx_model"
REQUIREMENTS = ["numpy", "onnxruntime", "latentcell"]


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    """Requests (a dict, a list of dicts, or a DataFrame of them) -> service responses."""

    def load_context(self, context) -> None:
        from .runtime.bundle import Bundle
        from .runtime.service import BundleService

        self.service = BundleService(Bundle.load(context.artifacts["bundle"]))

    def _one(self, request: dict) -> dict:
        route = self.service.predict if "controls" in request else self.service.generate
        return route(request)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_dict"):  # a DataFrame: one request per row
            model_input = model_input.to_dict(orient="records")
        if isinstance(model_input, dict):
            return self._one(model_input)
        return [self._one(dict(r)) for r in model_input]


def log_bundle(bundle_dir: str | os.PathLike, metadata: dict, register: str | None = None) -> dict:
    """Log the bundle to its source run (and register it as ``register``); returns the
    run id, artifact URI, model URI and registered version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    source = metadata["source"]
    run_id, uri = source.get("mlflow_run_id"), source.get("tracking_uri")
    if not run_id or not uri:
        raise DataValidationError(
            source["run"], "summary.json mlflow", "the run was not tracked in MLflow",
            "train with tracking.enabled=true, or export with --no-mlflow",
        )  # fmt: skip
    bundle_dir = Path(bundle_dir)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(bundle_dir), ARTIFACT_PATH)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        quiet = logging.getLogger("mlflow.pyfunc")  # its cloudpickle and type-hint advice
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with (
                warnings.catch_warnings(),
                mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None),
            ):
                warnings.simplefilter("ignore", UserWarning)
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=BundlePyfunc(),
                    artifacts={"bundle": str(bundle_dir)}, pip_requirements=REQUIREMENTS,
                )  # fmt: skip
        finally:
            quiet.setLevel(level)
        result = {"run_id": run_id, "artifacts": f"runs:/{run_id}/{ARTIFACT_PATH}",
                  "model_uri": info.model_uri, "registered": None}  # fmt: skip
        if register:
            version = mlflow.register_model(info.model_uri, register)
            result["registered"] = {"name": register, "version": int(version.version)}
        return result
    finally:
        mlflow.set_tracking_uri(previous)
