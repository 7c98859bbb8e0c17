"""An HTTP service over one bundle: generate and predict as JSON (standard library only).

    python -m latentcell.export.runtime serve --bundle DIR [--host 127.0.0.1 --port 8000]

    GET  /health    {"status": "ok", "kind": ..., "run": ..., "mlflow_run_id": ...}
    GET  /metadata  the bundle's metadata.json without the per-gene lists
    GET  /genes     the gene keys, ids and symbols in the order counts use
    POST /generate  {"n": 5, "conditions": {"cell_type": "B"}, "seed": 0,
                     "steps": 50, "guidance": 2.0}
                    -> {"genes": [...], "obs": {...}, "counts": [[...], ...]}
    POST /predict   {"controls": {"counts": [[...], ...], "genes": [...] (optional: reorders
                     columns; without it the columns must be the bundle's genes in order),
                     "cell_type": "A"}, "perturbations": ["STAT1"], "seed": 0,
                     "unseen": "error"}
                    -> {"genes": [...], "predictions": {"STAT1": [[...], ...]}}
                    one predicted cell per control cell, as counts at its library size

Bound to 127.0.0.1 by default: put a reverse proxy with authentication in front before
opening it to a network. ``ThreadingHTTPServer`` handles requests on threads; onnxruntime
sessions are safe to call concurrently. Bad requests get status 400 and
``{"error": "..."}`` naming the field and the fix; nothing else is kept between requests.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression import log1p_normalize, to_counts

from .bundle import Bundle

__all__ = ["BundleService", "make_server", "serve"]

MAX_CELLS = 20_000  # per request: bigger jobs belong in the command line (writes h5ad)


def _error(field: str, problem: str, fix: str) -> DataValidationError:
    return DataValidationError("request", field, problem, fix)


class BundleService:
    """The request -> response logic, separate from HTTP so it is testable on its own."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.generator = self.predictors = None
        if "generation" in bundle.metadata:
            from .generate import OnnxGenerator

            self.generator = OnnxGenerator(bundle)
        if bundle.kind == "prediction":
            from .predict import OnnxSetPredictor

            self.predictors = {u: OnnxSetPredictor(bundle, u) for u in ("error", "generic")}

    def health(self) -> dict:
        source = self.bundle.metadata["source"]
        return {"status": "ok", "kind": self.bundle.kind, "run": source["run"],
                "mlflow_run_id": source.get("mlflow_run_id")}  # fmt: skip

    def metadata(self) -> dict:
        return {k: v for k, v in self.bundle.metadata.items() if k != "genes"}

    def genes(self) -> dict:
        return self.bundle.metadata["genes"]

    def generate(self, body: dict) -> dict:
        if self.generator is None:
            raise _error("/generate", f"a {self.bundle.kind} bundle cannot generate",
                         "serve a latent-diffusion bundle")  # fmt: skip
        n = body.get("n")
        if not isinstance(n, int) or n < 1:
            raise _error("n", f"got {n!r}", "pass a positive integer")
        conditions = body.get("conditions", {})
        if not isinstance(conditions, dict):
            raise _error("conditions", "must be an object", 'e.g. {"cell_type": "B"}')
        conditions = {str(k): str(v) for k, v in conditions.items()}
        total = n * len(self.generator.space.rows(1, conditions))
        if total > MAX_CELLS:
            raise _error("n", f"{total} cells requested, above {MAX_CELLS}",
                         "ask for fewer cells, or use the generate command for large jobs")  # fmt: skip
        cells = self.generator.generate(
            n, conditions, _number(body, "steps", int), _number(body, "guidance", float),
            _number(body, "seed", int) or 0,
        )  # fmt: skip
        obs = {k: np.asarray(v).tolist() for k, v in cells.rows.obs.items()}
        obs["library_size"] = cells.library.tolist()
        return {"genes": self.bundle.genes, "obs": obs, "counts": cells.counts.astype(int).tolist()}

    def predict(self, body: dict) -> dict:
        if self.predictors is None:
            raise _error("/predict", f"a {self.bundle.kind} bundle does not predict",
                         "serve a fine-tuned ST bundle")  # fmt: skip
        unseen = body.get("unseen", "error")
        if unseen not in self.predictors:
            raise _error("unseen", f"got {unseen!r}", 'use "error" or "generic"')
        predictor = self.predictors[unseen]
        controls = body.get("controls")
        if not isinstance(controls, dict) or "counts" not in controls:
            raise _error("controls", "missing", 'pass {"controls": {"counts": [[...]], ...}}')
        counts = self._counts(controls)
        perturbations = body.get("perturbations")
        if not isinstance(perturbations, list) or not perturbations:
            raise _error("perturbations", f"got {perturbations!r}", 'e.g. ["STAT1"]')
        if len(counts) * len(perturbations) > MAX_CELLS:
            raise _error("controls", "too many cells x perturbations",
                         f"keep it under {MAX_CELLS}, or use the predict command")  # fmt: skip
        cell_type = str(controls.get("cell_type", ""))
        library = counts.sum(axis=1)
        x = log1p_normalize(counts, library)
        rng = np.random.default_rng(_number(body, "seed", int) or 0)
        out = {}
        for label in perturbations:
            pred = predictor.predict(x, str(label), cell_type, library, rng)
            out[str(label)] = to_counts(pred, library, rng).astype(int).tolist()
        return {"genes": self.bundle.genes, "predictions": out}

    def _counts(self, controls: dict) -> np.ndarray:
        try:
            counts = np.asarray(controls["counts"], dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise _error(
                "controls.counts", "not a numeric matrix", "pass lists of numbers"
            ) from err
        genes = self.bundle.genes
        if counts.ndim != 2 or len(counts) == 0:
            raise _error("controls.counts", f"shape {counts.shape}", "pass one list per cell")
        if "genes" in controls:
            given = [str(g) for g in controls["genes"]]
            if len(given) != counts.shape[1]:
                raise _error("controls.genes", f"{len(given)} names for {counts.shape[1]} columns",
                             "name every column once")  # fmt: skip
            missing = [g for g in genes if g not in given]
            if missing:
                raise _error("controls.genes", f"{len(missing)} of the model's genes are "
                             f"missing, e.g. {missing[:5]}", "GET /genes lists them")  # fmt: skip
            counts = counts[:, [given.index(g) for g in genes]]
        elif counts.shape[1] != len(genes):
            raise _error("controls.counts", f"{counts.shape[1]} columns, the model has "
                         f"{len(genes)} genes", "pass controls.genes, or the genes of GET /genes "
                         "in that order")  # fmt: skip
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise _error("controls.counts", "negative or non-finite values", "pass raw counts")
        return counts


def _number(body: dict, key: str, kind: type):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(key, f"got {value!r}", f"pass a number ({kind.__name__})")
    return kind(value)


def make_server(bundle: Bundle, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving; ``port=0`` picks a free one: ``server.server_port``)."""
    service = BundleService(bundle)
    routes_get = {"/health": service.health, "/metadata": service.metadata, "/genes": service.genes}
    routes_post = {"/generate": service.generate, "/predict": service.predict}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = routes_get.get(self.path)
            if route is None:
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            self._send(HTTPStatus.OK, route())

        def do_POST(self) -> None:  # noqa: N802
            route = routes_post.get(self.path)
            if route is None:
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise _error("body", "not a JSON object", "send a JSON object")
                self._send(HTTPStatus.OK, route(body))
            except json.JSONDecodeError as err:
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {err}"})
            except DataValidationError as err:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    return ThreadingHTTPServer((host, port), Handler)


def serve(bundle: Bundle, host: str = "127.0.0.1", port: int = 8000) -> None:
    server = make_server(bundle, host, port)
    print(
        f"serving {bundle.path} ({bundle.kind}) on http://{host}:{server.server_port}", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
