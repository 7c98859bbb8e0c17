"""An HTTP service over one bundle: generate and predict as JSON, on Starlette and uvicorn.

    python -m latentcell.export.runtime serve --bundle DIR [--host 127.0.0.1 --port 8000]
        [--max-body-bytes N --read-timeout S --concurrency N --queue N --max-connections N
         --workers N]

    GET  /health    {"status": "ok", "kind": ..., "run": ..., "mlflow_run_id": ...}
    GET  /metadata  the bundle's metadata.json without the per-gene lists
    GET  /genes     the gene keys, ids and symbols in the order counts use
    POST /generate  {"n": 5, "conditions": {"cell_type": "B"}, "seed": 0,
                     "steps": 50, "guidance": 2.0}
                    -> {"genes": [...], "obs": {...}, "counts": [[...], ...]}
    POST /predict   {"controls": {"counts": [[...], ...], "genes": [...] (optional: names
                     the columns by gene key, Ensembl id or symbol, in any order, extra genes
                     allowed; without it the columns must be the bundle's genes in order),
                     "cell_type": "A"}, "perturbations": ["STAT1"], "seed": 0,
                     "unseen": "error"}
                    -> {"genes": [...], "predictions": {"STAT1": [[...], ...]}}
                    one predicted cell per control cell, as counts at its library size, in
                    the controls' columns and names (``inference/gene_names.py``'s rule:
                    columns outside the model keep the control's counts)

Bound to 127.0.0.1 by default: put a reverse proxy with authentication in front before
opening it to a network.

Every request gets a status and a JSON body ``{"error": "<field>: <problem>. Fix: <fix>",
"field": ..., "fix": ...}`` (a 500 adds ``request_id``; its traceback goes to the server log
under that id, never to the client). This module holds what is particular to a bundle:
``BundleService`` (the request -> response logic, testable without HTTP, its schemas built
from ``request_schema``), the routes, and the server's lifecycle. What bounds a client's
cost (head and body deadlines, the body cap, the compute pool and its queue) is in
``http_limits``.

**Processes**: ``--workers N`` runs N processes through uvicorn's supervisor, each loading
the bundle, sharing one listening socket. SIGTERM drains (uvicorn's graceful shutdown, at
most 10 s) and exits with status 0.

Limits, with the reasons: ``n`` and cells x perturbations at most ``MAX_CELLS`` (bigger jobs
belong in the commands, which write h5ad); ``steps`` 1 to 1000 (and at most the DDPM's
training steps); ``guidance`` 0 to 100; ``seed`` an integer in [0, 2**32 - 1], the range
every numpy seeding path accepts (``default_rng`` takes larger ones, but a seed the client
cannot reproduce elsewhere helps no one); counts finite, non-negative and at most 1e9.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression import log1p_normalize, to_counts

from .bundle import Bundle
from .http_limits import (
    REQUEST_ID,
    BodyDeadline,
    Busy,
    ComputeGate,
    Edge,
    ServiceLimits,
    body_refusal,
    error_body,
    error_response,
    internal_error,
    json_response,
    log,
    uvicorn_config,
)
from .request_schema import (
    Choice,
    CountMatrix,
    Fields,
    Integer,
    Number,
    Text,
    TextList,
    TextMap,
    parse_json_object,
    request_error,
    show_value,
)

__all__ = [
    "MAX_CELLS",
    "BundleService",
    "ServiceLimits",
    "ServiceServer",
    "build_app",
    "make_server",
    "serve",
]

MAX_CELLS = 20_000  # per request: bigger jobs belong in the command line (writes h5ad)
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**32 - 1
UNSEEN = ("error", "generic")
GET_ROUTES = ("health", "metadata", "genes")  # answered from memory, on the event loop
POST_ROUTES = ("generate", "predict")  # parsed, checked and computed on the compute pool
ROUTES = f"GET /{', /'.join(GET_ROUTES)}; POST /{', /'.join(POST_ROUTES)}"
DEFAULT_LIMITS = ServiceLimits()


# -- the request -> response logic -----------------------------------------------------------


def _refined(err: DataValidationError, field: str) -> DataValidationError:
    """An error from the model layer (which names command-line flags) restated as a request
    field, keeping the model layer's detail and fix."""
    detail = err.field.removeprefix("--condition ").removeprefix("--")
    fix = err.fix.replace("--unseen generic", '"unseen": "generic"').replace("--unseen", "unseen")
    return request_error(field, f"{detail}: {err.problem}", fix)


class BundleService:
    """The request -> response logic, separate from HTTP so it is testable on its own.

    ``generate(body)`` and ``predict(body)`` take the parsed JSON object and return the
    answer, or raise ``DataValidationError`` naming the request field (a 400)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.generator = self.predictors = None
        seed = Integer(0, MAX_SEED)
        if "generation" in bundle.metadata:
            from .generate import OnnxGenerator

            self.generator = OnnxGenerator(bundle)
            alphas = len(self.generator.alphas)
            steps = MAX_STEPS if self.generator.diffusion["objective"] == "flow" else alphas
            self.generate_schema = Fields(
                {"n": Integer(1, MAX_CELLS), "conditions": TextMap('{"cell_type": "B cell"}'),
                 "steps": Integer(1, min(MAX_STEPS, steps)),
                 "guidance": Number(0.0, MAX_GUIDANCE), "seed": seed},
                required=("n",),
            )  # fmt: skip
        if bundle.kind == "prediction":
            from .predict import OnnxSetPredictor

            self.predictors = {u: OnnxSetPredictor(bundle, u) for u in UNSEEN}
            controls = Fields(
                {"counts": CountMatrix(MAX_CELLS),
                 "genes": TextList('["ENSG00000115415", "IRF1", ...]', 10**6),
                 "cell_type": Text()},
                required=("counts",),
            )  # fmt: skip
            self.predict_schema = Fields(
                {"controls": controls, "perturbations": TextList('["STAT1"]', MAX_CELLS),
                 "unseen": Choice(UNSEEN), "seed": seed},
                required=("controls", "perturbations"),
            )  # fmt: skip

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
            raise request_error("/generate", f"a {self.bundle.kind} bundle cannot generate",
                                "serve a latent-diffusion bundle")  # fmt: skip
        request = self.generate_schema(body)
        n, conditions = request["n"], request.get("conditions", {})
        try:  # unknown columns or labels; a continuous value that is not a finite number
            combos = len(self.generator.space.rows(1, conditions))
        except DataValidationError as err:
            raise _refined(err, "conditions") from None
        if n * combos > MAX_CELLS:
            raise request_error("n", f"{n * combos} cells requested ({n} x {combos} "
                                f"combinations), above {MAX_CELLS}", "ask for fewer cells, or "
                                "use the generate command for large jobs")  # fmt: skip
        cells = self.generator.generate(
            n, conditions, request.get("steps"), request.get("guidance"), request.get("seed", 0)
        )
        obs = {k: np.asarray(v).tolist() for k, v in cells.rows.obs.items()}
        obs["library_size"] = cells.library.tolist()
        return {"genes": self.bundle.genes, "obs": obs, "counts": cells.counts.astype(int).tolist()}

    def predict(self, body: dict) -> dict:
        if self.predictors is None:
            raise request_error("/predict", f"a {self.bundle.kind} bundle does not predict",
                                "serve a fine-tuned ST bundle")  # fmt: skip
        request = self.predict_schema(body)
        predictor = self.predictors[request.get("unseen", "error")]
        controls = request["controls"]
        counts, columns = controls["counts"], self._columns(controls)
        perturbations = request["perturbations"]
        if len(counts) * len(perturbations) > MAX_CELLS:
            raise request_error("controls.counts", f"{len(counts)} cells x {len(perturbations)} "
                                f"perturbations is above {MAX_CELLS}",
                                "send fewer, or use the predict command")  # fmt: skip
        cell_type = controls.get("cell_type", "")
        if "cell_type" in predictor.model.input_names and cell_type not in predictor.cell_types:
            problem = (f"{show_value(cell_type)} is not a cell type of this model" if cell_type
                       else "missing: this model conditions on the controls' cell type")  # fmt: skip
            raise request_error("controls.cell_type", problem,
                                f"use one of {predictor.cell_types[:20]}")  # fmt: skip
        self._check_trained_cell_type(predictor, cell_type)
        library = counts.sum(axis=1)  # every column, as the predict command counts a cell
        x = log1p_normalize(counts[:, columns], library)
        rng = np.random.default_rng(request.get("seed", 0))
        out = {}
        for label in perturbations:
            try:
                pred = predictor.predict(x, label, cell_type, library, rng)
            except DataValidationError as err:
                raise _refined(err, "perturbations") from None
            cells = counts.copy()  # columns outside the model keep the control's counts
            cells[:, columns] = to_counts(pred, library, rng)
            out[label] = cells.astype(int).tolist()
        return {"genes": controls.get("genes", self.bundle.genes), "predictions": out}

    @staticmethod
    def _check_trained_cell_type(predictor, cell_type: str) -> None:
        """A cell type the model has no trained parameters for, refused as a request field
        (the service has no unknown-cell-type fallback)."""
        if "cell_type" not in predictor.model.input_names:
            return
        why = predictor.untrained_cell_type(cell_type)
        if why:
            trained = [t for t in predictor.cell_types if not predictor.untrained_cell_type(t)]
            raise request_error("controls.cell_type", f"{show_value(cell_type)}: {why}",
                                f"use one of {trained[:20]}, or the predict command's "
                                "unknown cell type")  # fmt: skip

    def _columns(self, controls: dict) -> list[int]:
        """The column of ``controls.counts`` holding each model gene: named by
        ``controls.genes`` (keys, Ensembl ids or symbols; ``inference/gene_names.py``), else
        the model's genes in order."""
        counts, genes = controls["counts"], self.bundle.genes
        if "genes" not in controls:
            if counts.shape[1] != len(genes):
                raise request_error("controls.counts", f"{counts.shape[1]} columns, the model "
                                    f"has {len(genes)} genes", "pass controls.genes, or the "
                                    "genes of GET /genes in that order")  # fmt: skip
            return list(range(len(genes)))
        given = controls["genes"]
        if len(given) != counts.shape[1]:
            raise request_error("controls.genes", f"{len(given)} names for {counts.shape[1]} "
                                "columns", "name every column once")  # fmt: skip
        return self.bundle.gene_names.positions(
            given, "request", "controls.genes",
            "GET /genes lists them (name each by its key, Ensembl id or symbol)",
        )  # fmt: skip


# -- the app ----------------------------------------------------------------------------------


def build_app(service: BundleService, limits: ServiceLimits = DEFAULT_LIMITS):
    """The ASGI application for one service (uvicorn serves it; ``make_server`` wires both)."""
    gate = ComputeGate(limits.concurrency, limits.queue)
    fixed = {name: json.dumps(getattr(service, name)()).encode() for name in GET_ROUTES}

    def answer(route: Callable[[dict], dict], raw: bytes) -> tuple[int, bytes]:
        """Runs on the pool: parse, validate, compute, encode (all CPU-bound)."""
        try:
            result = route(parse_json_object(raw))
        except DataValidationError as err:
            return 400, error_body(err.field, err.problem, err.fix)
        return 200, json.dumps(result, allow_nan=False).encode()

    def post(route: Callable[[dict], dict]):
        async def endpoint(request: Request) -> Response:
            raw = await request.body()  # size: Starlette's max_body_size; time: BodyDeadline
            try:
                status, body = await gate.run(answer, route, raw)
            except Busy as busy:
                return error_response(503, "request", str(busy), "retry in a moment",
                                      {"Retry-After": "1"})  # fmt: skip
            return json_response(status, body)

        return endpoint

    def get(name: str):
        async def endpoint(request: Request) -> Response:
            return json_response(200, fixed[name])

        return endpoint

    async def http_error(request: Request, exc: HTTPException) -> Response:
        status, headers = exc.status_code, dict(exc.headers or {})
        method, path = request.scope["method"], show_value(request.scope["path"])
        if status in (408, 413):
            return body_refusal(status, limits)
        if status == 404:
            return error_response(404, "path", f"no route {path}", f"use {ROUTES}", headers)
        if status == 405:
            return error_response(405, "method", f"{method} is not allowed on {path}",
                                  f"use {headers.get('Allow', '')}", headers)  # fmt: skip
        return error_response(status, "request", str(exc.detail), "check the request", headers)

    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return error_response(400, "body", "the client left mid-body", "send the whole body")

    async def crashed(request: Request, exc: Exception) -> Response:
        return internal_error(request.scope.get(REQUEST_ID, "-"), request.scope, exc)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            gate.close()

    app = Starlette(
        routes=[
            *(Route(f"/{n}", get(n), methods=["GET"]) for n in GET_ROUTES),
            *(Route(f"/{n}", post(getattr(service, n)), methods=["POST"]) for n in POST_ROUTES),
        ],
        exception_handlers={
            HTTPException: http_error,
            ClientDisconnect: disconnected,
            Exception: crashed,
        },  # fmt: skip
        middleware=[Middleware(BodyDeadline, seconds=limits.read_timeout_s)],
        lifespan=lifespan,
        max_body_size=limits.max_body_bytes,
    )
    app.router.redirect_slashes = False  # /health/ is a 404, not a redirect without a body
    return Edge(app, limits.max_body_bytes)


# -- the server -----------------------------------------------------------------------------------


def _log_config() -> dict:
    """uvicorn's logging with everything (access lines included) on stderr, so stdout holds
    only the "serving ... on URL" line; the service's own log (500s) goes there too."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"][log.name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _listening(config: uvicorn.Config) -> socket.socket:
    """The bound socket, already listening: a client that connects as soon as the URL is
    printed waits in the backlog until the event loop accepts it, instead of being refused."""
    sock = config.bind_socket()
    sock.listen(config.backlog)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServiceServer:
    """A uvicorn server bound to its socket (``port=0`` picks a free one: ``.port``).

    ``serve_forever()`` blocks; ``start()`` serves from a background thread and returns once
    the server listens; ``shutdown()`` stops it (tests use ``with make_server(...).start()``)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.socket = _listening(config)
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = _url(self.socket)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> ServiceServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="uvicorn")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> ServiceServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def make_server(
    bundle: Bundle,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServiceLimits = DEFAULT_LIMITS,
    log_config: dict | None = None,
) -> ServiceServer:
    """A server for ``bundle``, bound but not yet serving. ``log_config=None`` leaves the
    process's logging as it is (tests); ``serve`` passes uvicorn's, on stderr."""
    app = build_app(BundleService(bundle), limits)
    return ServiceServer(uvicorn_config(app, host, port, limits, log_config=log_config))


_WORKER_ENV = "LATENTCELL_SERVE_WORKER"


def _worker_app():
    """The app factory each ``--workers`` process calls (settings come by environment)."""
    settings = json.loads(os.environ[_WORKER_ENV])
    bundle = Bundle.load(settings["bundle"], threads=settings["threads"])
    return build_app(BundleService(bundle), ServiceLimits(**settings["limits"]))


def _exit_on_sigterm() -> None:
    """SIGTERM ends the process with status 0 after uvicorn's graceful shutdown (uvicorn
    re-raises the signal once it has drained; the default action would end it with -15)."""

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def serve(
    bundle: Bundle | str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    limits: ServiceLimits = DEFAULT_LIMITS,
    workers: int = 1,
) -> None:
    """Serve until SIGINT/SIGTERM; prints ``serving DIR (KIND) on URL`` once listening."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle, threads=threads)  # fails here, in one line, if bad
    if workers == 1:
        server = make_server(bundle, host, port, limits, log_config=_log_config())
        print(f"serving {bundle.path} ({bundle.kind}) on {server.url}", flush=True)
        if threading.current_thread() is threading.main_thread():
            _exit_on_sigterm()
        server.serve_forever()
        return
    from uvicorn.supervisors import Multiprocess

    os.environ[_WORKER_ENV] = json.dumps(
        {"bundle": str(Path(bundle.path).absolute()), "threads": threads, "limits": asdict(limits)}
    )
    config = uvicorn_config(f"{__name__}:_worker_app", host, port, limits, factory=True,
                            workers=workers, log_config=_log_config())  # fmt: skip
    sock = _listening(config)
    print(f"serving {bundle.path} ({bundle.kind}, {workers} workers) on {_url(sock)}", flush=True)
    del bundle  # each worker loads its own
    # uvicorn before its supervisor rewrite took the server's run method as ``target``
    takes_target = "target" in inspect.signature(Multiprocess).parameters
    extra = {"target": uvicorn.Server(config).run} if takes_target else {}
    Multiprocess(config, sockets=[sock], **extra).run()
