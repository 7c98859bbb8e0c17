"""The HTTP layers that bound what one client can cost the service, and answer in JSON when
they refuse: time, body size, concurrency, plus a request id and a last-resort 500.

Each concern sits in the layer built for it, rather than in checks per case:

- **HTTP parsing** (uvicorn's h11 protocol): bytes that are not an HTTP request (a garbage
  request line, a bad, negative or conflicting Content-Length, broken chunking, a head still
  incomplete past h11's 16 KiB) get 400 and the connection is closed.
  ``HeadDeadlineProtocol`` only gives that 400 a JSON body.
- **Timeouts**: uvicorn's ``timeout_keep_alive`` closes idle keep-alive connections; uvicorn
  has no deadline for a request that has started, so ``HeadDeadlineProtocol`` adds one for
  the head and ``BodyDeadline`` one for the body: what has not arrived ``read_timeout_s``
  after the connection opened (or the previous response ended), or after the head, gets 408.
- **Body size**: Starlette's ``max_body_size`` counts a streamed (chunked) body; ``Edge``
  refuses a declared Content-Length above the cap before reading a byte. Both answer 413.
- **Concurrency**: uvicorn's ``limit_concurrency`` caps open connections plus running
  requests at ``max_connections`` (above it uvicorn itself answers a text/plain 503 and
  closes: the one answer that is not JSON). ``ComputeGate`` runs parsing, validation and
  compute on a pool of ``concurrency`` threads (onnxruntime sessions are safe to call
  concurrently) with at most ``queue`` more requests waiting; beyond that the answer is 503
  JSON with Retry-After. The event loop itself only moves bytes, so ``/health`` answers while
  the pool is busy. Bodies are read before a request waits for the pool, so at most
  ``max_connections`` bodies of ``max_body_bytes`` are held at once.

Nothing here knows the routes or the bundle: ``service`` wires these layers around its app.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from latentcell.data_pipelines.errors import DataValidationError

__all__ = [
    "REQUEST_ID",
    "BodyDeadline",
    "Busy",
    "ComputeGate",
    "Edge",
    "HeadDeadlineProtocol",
    "ServiceLimits",
    "body_refusal",
    "error_body",
    "error_response",
    "internal_error",
    "json_response",
    "log",
    "uvicorn_config",
]

JSON = "application/json"
REQUEST_ID = "latentcell.request_id"  # the scope key ``Edge`` sets
SMALLER = "send fewer cells per request, or use the generate/predict commands for big jobs"

log = logging.getLogger("latentcell.export.service")  # the service's one logger

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceLimits:
    """What one server process accepts. ``max_body_bytes``: 16 MiB holds about 3,000 cells
    of 2,000 genes of small counts; ``read_timeout_s``: for a request's head and, separately,
    its body; ``concurrency``: requests computed at once; ``queue``: more that may wait;
    ``max_connections``: uvicorn's ``limit_concurrency``; ``keep_alive_s``: uvicorn's
    ``timeout_keep_alive``."""

    max_body_bytes: int = 16 * 2**20
    read_timeout_s: float = 30.0
    concurrency: int = 2
    queue: int = 8
    max_connections: int = 64
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            seconds = name.endswith("_s")
            least = 0 if name == "queue" else 1e-3 if seconds else 1
            if type(value) not in ((int, float) if seconds else (int,)) or not value >= least:
                raise DataValidationError(
                    "serve", f"--{name.replace('_', '-').removesuffix('-s')}", f"got {value!r}",
                    f"pass {'a number of seconds' if seconds else 'an integer'} >= {least:g}",
                )  # fmt: skip


# -- JSON answers ------------------------------------------------------------------------------


def error_body(field: str, problem: str, fix: str, **extra) -> bytes:
    """The one error body every refusal carries: the house's error line, and its parts."""
    payload = {"error": f"{field}: {problem}. Fix: {fix}", "field": field, "fix": fix, **extra}
    return json.dumps(payload).encode()


def json_response(status: int, body: bytes, headers: dict | None = None) -> Response:
    return Response(body, status, headers=headers, media_type=JSON)


def error_response(
    status: int, field: str, problem: str, fix: str, headers: dict | None = None, **extra
) -> Response:
    return json_response(status, error_body(field, problem, fix, **extra), headers)


def body_refusal(status: int, limits: ServiceLimits) -> Response:
    """The answer when a body broke a limit while being read: 408 (``BodyDeadline``) or 413
    (Starlette's ``max_body_size``, for a streamed body). The rest of it is not read, so the
    connection closes."""
    if status == 408:
        problem = f"the body did not arrive within {limits.read_timeout_s:g} s of the request head"
        fix = "send the whole body promptly"
    else:
        problem, fix = f"larger than the limit of {limits.max_body_bytes} bytes", SMALLER
    return error_response(status, "body", problem, fix, {"Connection": "close"})


def internal_error(request_id: str, scope, exc: BaseException) -> Response:
    """A bug: the traceback goes to the log under the request id, the client gets only the id."""
    log.error("request %s: %s %s failed", request_id, scope.get("method"),
              scope.get("path", "")[:200], exc_info=exc)  # fmt: skip
    return error_response(500, "request", "internal error", "report the request_id with the "
                          "request; the server log has the details", {"Connection": "close"},
                          request_id=request_id)  # fmt: skip


def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for the protocol layer (which
    answers before or outside h11's request cycle)."""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {JSON}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


# -- the connection: the head's deadline -------------------------------------------------------


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head, and JSON on its 400.

    uvicorn's keep-alive timer closes idle connections, but is cancelled by any byte, so a
    client trickling a head (slowloris) would hold its connection, and a slot of
    ``limit_concurrency``, forever. Here the head must be complete ``head_timeout_s`` after
    the connection opens or the previous response ends; if not: 408 and close. (A
    connection that sent nothing at all is closed without an answer: it made no request.)"""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.config.head_timeout_s, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:  # idle
            self.transport.close()
        elif self.conn.their_state is h11.IDLE:  # part of a head, and no more
            body = error_body("request", "the request head did not arrive in time",
                              "send the whole request promptly")  # fmt: skip
            self.transport.write(_raw_response(408, "Request Timeout", body))
            self.transport.close()
        elif self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):  # answered; body still trickling
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = error_body("request", "not a valid HTTP/1.1 request",
                          "send a well-formed request (one Content-Length or chunked body, "
                          "a Host header, a head under 16 KiB)")  # fmt: skip
        self.transport.write(_raw_response(400, "Bad Request", body))
        self.transport.close()


class _Config(uvicorn.Config):
    """uvicorn's config plus the head deadline ``HeadDeadlineProtocol`` reads (a plain
    attribute, so the config still pickles into ``--workers`` processes)."""

    def __init__(self, app, head_timeout_s: float, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.head_timeout_s = head_timeout_s


def uvicorn_config(app, host: str, port: int, limits: ServiceLimits, **kwargs) -> uvicorn.Config:
    """uvicorn's settings for ``app`` under ``limits`` (``kwargs``: logging, workers, ...)."""
    return _Config(
        app, head_timeout_s=limits.read_timeout_s, host=host, port=port,
        http=HeadDeadlineProtocol, ws="none", lifespan="on", proxy_headers=False,
        server_header=False, limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=10, **kwargs,
    )  # fmt: skip


# -- ASGI layers: the body's deadline, the edge ------------------------------------------------


class BodyDeadline:
    """The whole body must arrive within ``seconds`` of the request head (one deadline, not
    one per read, so a trickling body cannot stretch it); else an HTTPException(408)."""

    def __init__(self, app, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.seconds

        async def timed_receive():
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                raise HTTPException(408) from None

        await self.app(scope, timed_receive, send)


class Edge:
    """The outermost layer: a request id on every response (``X-Request-Id``), 413 for a
    declared body above the cap before anything is read, and a JSON 500 for anything that
    escapes below (Starlette's error handler has already logged it and answered if it could)."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = scope[REQUEST_ID] = uuid.uuid4().hex[:16]
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        declared = Headers(scope=scope).get("content-length", "")  # digits only: h11 checked
        if declared.isdecimal() and int(declared) > self.max_body_bytes:
            response = error_response(413, "body", f"{int(declared)} bytes declared, above the "
                                      f"limit of {self.max_body_bytes}", SMALLER,
                                      {"Connection": "close"})  # fmt: skip
            return await response(scope, receive, send_with_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the edge: answer, never drop the connection
            if not started:
                await internal_error(request_id, scope, exc)(scope, receive, send_with_id)


# -- compute: a bounded pool -----------------------------------------------------------------


class Busy(Exception):
    """More requests are computing or waiting than the pool and its queue hold."""


class ComputeGate:
    """CPU-bound work on a pool of ``workers`` threads, with at most ``queue`` more requests
    waiting; beyond that ``run`` raises ``Busy`` at once (a 503) instead of piling up work.
    ``admitted`` (computing or waiting) is touched on the event loop only."""

    def __init__(self, workers: int, queue: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "latentcell-compute")
        self.capacity = workers + queue
        self.admitted = 0

    async def run(self, work: Callable[..., T], *args) -> T:
        if self.admitted >= self.capacity:
            raise Busy(f"busy: {self.admitted} requests in progress")
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        finally:
            self.admitted -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
