"""A bundle in MLflow: the files as artifacts of the run it came from, and a registrable
pyfunc model that serves it with the torch-free runtime.

``log_bundle`` puts the bundle under ``onnx_bundle/`` of the source run (the run id is in
the run's summary.json, copied into the bundle's metadata at export) and logs an
``onnx_model`` pyfunc whose only artifact is the bundle; ``register`` names it in the model
registry. ``mlflow.pyfunc.load_model("models:/NAME/1").predict(request)`` then takes the
same JSON requests as the HTTP service (``runtime/service.py``): ``{"n": .., "conditions":
{..}}`` to generate, ``{"controls": {..}, "perturbations": [..]}`` to predict.

The training run is not reopened (``trainer.tracking.log_model_to_run``): its status and end
time stay those of the training. The model carries what a registry user needs to call it:
an input example that the bundle answers (checked here, then by MLflow), an outputs-only
signature, tags and a description (``bundle_tags``, ``describe``). Inputs get no schema on
purpose: MLflow enforces an input schema by turning a request dict into a DataFrame, which
mangles the nested fields (``{"conditions": {"cell_type": "B"}}`` arrives as ``"B"``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["BundlePyfunc", "bundle_tags", "describe", "log_bundle", "request_example"]

ARTIFACT_PATH = "onnx_bundle"
MODEL_NAME = "onnx_model"
REQUIREMENTS = ["numpy", "onnxruntime", "latentcell"]
TAG = "latentcell."  # prefix of the tags this module sets


def _plain(value):
    """numpy values (MLflow's serving path sends a request as 0-d arrays) -> Python's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    """Requests (a dict, a list of dicts, or a DataFrame of them) -> service responses."""

    def load_context(self, context) -> None:
        from .runtime.bundle import Bundle
        from .runtime.service import BundleService

        self.service = BundleService(Bundle.load(context.artifacts["bundle"]))

    def _one(self, request: dict) -> dict:
        request = _plain(request)
        route = self.service.predict if "controls" in request else self.service.generate
        return route(request)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_dict"):  # a DataFrame: one request per row
            model_input = model_input.to_dict(orient="records")
        if isinstance(model_input, dict):
            return self._one(model_input)
        return [self._one(dict(r)) for r in model_input]


def _family(metadata: dict) -> str:
    from latentcell.families import family_of_card

    try:
        return family_of_card({"class": metadata["source"].get("class")}, "metadata").name
    except DataValidationError:
        return "unknown"


def _conditions(metadata: dict) -> dict[str, int | str]:
    """Condition -> its number of labels ("continuous" for a number), per bundle kind."""
    if "generation" in metadata:
        space = metadata["generation"]["conditions"]
        out: dict[str, int | str] = {k: len(v) for k, v in space["categories"].items()}
        return out | {c: "continuous" for c in space.get("continuous", [])}
    section = (metadata.get("prediction") or metadata.get("cvae") or metadata.get("latent_delta")
               or metadata.get("masked_diffusion") or {})  # fmt: skip
    out = {"perturbation": len(section["labels"])} if section.get("labels") else {}
    return out | ({"cell_type": len(section["cell_types"])} if section.get("cell_types") else {})


def bundle_tags(metadata: dict) -> dict[str, str]:
    """What a registry or LoggedModel list filters on, under ``latentcell.``."""
    source = metadata["source"]
    tags = {
        "family": _family(metadata),
        "kind": metadata["kind"],
        "n_genes": len(metadata["genes"]["gene_key"]),
        "conditions": json.dumps(_conditions(metadata)),
        "source_run_id": source.get("mlflow_run_id") or "",
        "source_run": source["run"],
        "weights": source.get("weights", ""),
        "bundle_format": metadata["format"],
        "bundle_format_version": metadata["format_version"],
    }
    return {TAG + k: str(v) for k, v in tags.items()}


def request_example(metadata: dict) -> dict | None:
    """A small request the bundle answers (two cells, two sampler steps; one control cell),
    or None for the kinds the service does not serve."""
    if "generation" in metadata:
        categories = metadata["generation"]["conditions"]["categories"]
        conditions = {col: labels[0] for col, labels in list(categories.items())[:1] if labels}
        return {"n": 2, "conditions": conditions, "steps": 2, "seed": 0}
    if metadata["kind"] != "prediction":
        return None
    p = metadata["prediction"]
    labels = [x for x in (p.get("trained") or p["labels"]) if x != p.get("control_label")]
    if not labels:
        return None
    controls: dict = {"counts": [[1] * len(metadata["genes"]["gene_key"])]}
    trained = [t for t in (p.get("trained_cell_types") or p["cell_types"]) if t in p["cell_types"]]
    if trained:
        controls["cell_type"] = trained[0]
    return {"controls": controls, "perturbations": labels[:1], "seed": 0}


def _signature(kind: str):
    """The responses' fields (outputs only: see the module docstring for the inputs)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Map, Schema

    genes, counts = ColSpec(Array("string"), "genes"), Array(Array("long"))
    fields = {
        "generation": [genes, ColSpec(AnyType(), "obs"), ColSpec(counts, "counts")],
        "prediction": [genes, ColSpec(Map(counts), "predictions")],
    }.get(kind)
    return ModelSignature(outputs=Schema(fields)) if fields else None


def describe(metadata: dict, example: dict | None) -> str:
    """The registered model version's description: what it is, from where, how to call it."""
    source, tags = metadata["source"], bundle_tags(metadata)
    conditions = ", ".join(f"{k} ({v})" for k, v in _conditions(metadata).items()) or "none"
    lines = [
        f"latentcell {tags[TAG + 'family']} model, a {metadata['kind']} bundle "
        f"({metadata['format']} v{metadata['format_version']}), served by onnxruntime (no torch).",
        f"Genes: {tags[TAG + 'n_genes']}. Conditions (labels): {conditions}.",
        f"Trained in {source['run']} (MLflow run {source.get('mlflow_run_id')}, "
        f"{source.get('weights')} weights); exported {metadata.get('created')}.",
    ]
    if example is not None:
        shown = json.dumps(example)
        shown = shown if len(shown) <= 300 else shown[:200] + " ...}"
        lines.append(f"Call: mlflow.pyfunc.load_model(uri).predict({shown}), the requests of "
                     "`python -m latentcell.export.runtime serve`.")  # fmt: skip
    return "\n\n".join(lines)


def _checked_example(bundle_dir: Path, metadata: dict) -> dict | None:
    """``request_example`` if the bundle answers it, else None (and a warning)."""
    example = request_example(metadata)
    if example is None:
        return None
    from .runtime.bundle import Bundle
    from .runtime.service import BundleService

    model = BundlePyfunc()
    try:
        model.service = BundleService(Bundle.load(bundle_dir))
        model.predict(None, example)
    except Exception as exc:
        warnings.warn(f"no input example logged: the bundle refused it: {exc}", stacklevel=3)
        return None
    return example


def log_bundle(bundle_dir: str | os.PathLike, metadata: dict, register: str | None = None) -> dict:
    """Log the bundle to its source run (and register it as ``register``); returns the
    run id, artifact URI, model URI and registered version."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from latentcell.trainer.tracking import log_model_to_run

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
    client.log_artifacts(run_id, str(bundle_dir), ARTIFACT_PATH)  # the run itself is untouched
    example, tags = _checked_example(bundle_dir, metadata), bundle_tags(metadata)
    description = describe(metadata, example)

    def log(**ids):
        return Model.log(
            None, name=MODEL_NAME, flavor=mlflow.pyfunc, python_model=BundlePyfunc(),
            artifacts={"bundle": str(bundle_dir)}, pip_requirements=REQUIREMENTS,
            signature=_signature(metadata["kind"]), input_example=example, **ids,
        )  # fmt: skip

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # Model.log saves through the fluent URI
    quiet = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models")]  # advice, info
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = log_model_to_run(client, run_id, MODEL_NAME, log, tags=tags)
        result = {"run_id": run_id, "artifacts": f"runs:/{run_id}/{ARTIFACT_PATH}",
                  "model_uri": info.model_uri, "registered": None}  # fmt: skip
        if register:
            # register_model prints "Successfully registered model ..." to stderr itself:
            # a notice, shown only when MLflow's own logger shows notices (``--verbose``)
            notices = logging.getLogger("mlflow").isEnabledFor(logging.INFO)
            with contextlib.nullcontext() if notices else contextlib.redirect_stderr(io.StringIO()):
                version = mlflow.register_model(info.model_uri, register, tags=tags)
            client.update_model_version(register, version.version, description)
            if not client.get_registered_model(register).description:  # keep a user's text
                client.update_registered_model(register, description.split("\n\n")[0])
            for key in (TAG + "family", TAG + "kind"):
                client.set_registered_model_tag(register, key, tags[key])
            result["registered"] = {"name": register, "version": int(version.version)}
        return result
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        mlflow.set_tracking_uri(previous)
