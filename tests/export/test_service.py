"""The HTTP service on uvicorn over loopback, tested as an attacker would: every kind of bad
request (bad JSON types, bad JSON, bad HTTP, wrong routes and methods, slow or oversized
bodies, a busy server, a bug) gets a status and a JSON body naming the field and the fix."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.export.runtime import Bundle
from latentcell.export.runtime.http_limits import Edge
from latentcell.export.runtime.request_schema import parse_json_object
from latentcell.export.runtime.service import (
    MAX_CELLS,
    BundleService,
    ServiceLimits,
    make_server,
)

LIMITS = ServiceLimits(read_timeout_s=1.0, max_body_bytes=256 * 1024)

# -- a raw HTTP client: the point is to send what an HTTP library would refuse to ----------------


@dataclass
class Reply:
    status: int | None  # None: the connection ended without a status line
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        return json.loads(self.body)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        return sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
        return b""


def read_reply(sock: socket.socket, timeout: float = 10.0, head: bool = False) -> Reply:
    """One response: status line and headers, then the body by Content-Length (none for a
    HEAD request), or up to the close."""
    deadline, data = time.monotonic() + timeout, b""
    while b"\r\n\r\n" not in data or data.startswith(b"HTTP/1.1 100 "):
        if data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:  # 100 Continue
            data = data.partition(b"\r\n\r\n")[2]
            continue
        chunk = _recv(sock, deadline)
        if not chunk:
            return Reply(None, body=data)
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    reply = Reply(int(lines[0].split()[1]), headers)
    if head:
        return reply
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        chunk = _recv(sock, deadline)
        if not chunk:
            break
        body += chunk
    reply.body = body if length < 0 else body[:length]
    return reply


def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 10.0) -> Reply:
    """Send ``parts`` (``pause`` seconds apart) on a new connection and read one reply;
    sending stops once the server has answered (as a real client would)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            if i and select.select([sock], [], [], 0)[0]:  # answered (or closed) already
                break
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed early
                break
        head = parts[0].startswith(b"HEAD ") if parts else False
        return read_reply(sock, timeout, head=head)


def request(method: str, path: str, body: bytes | None = None, headers: str = "") -> bytes:
    length = "" if body is None else f"Content-Length: {len(body)}\r\n"
    top = f"{method} {path} HTTP/1.1\r\nHost: test\r\n{length}{headers}\r\n"
    return top.encode() + (body or b"")


def post(port: int, path: str, body, **kwargs) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return exchange(port, request("POST", path, raw, "Connection: close\r\n"), **kwargs)


def assert_error(reply: Reply, status: int, field_: str | None = None) -> dict:
    """The reply has ``status`` and the JSON error body (naming ``field_`` when given)."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers.get("content-type") == "application/json", reply.headers
    payload = reply.json()
    assert set(payload) >= {"error", "field", "fix"} and payload["fix"], payload
    if field_ is not None:
        assert payload["field"] == field_, payload
    return payload


# -- servers ----------------------------------------------------------------------------------


@pytest.fixture
def start():
    """start(bundle_dir, **limits) -> a running server on a free port, stopped afterwards."""
    servers = []

    def _start(bundle_dir, **limits):
        settings = {**LIMITS.__dict__, **limits}
        server = make_server(Bundle.load(bundle_dir, threads=1), "127.0.0.1", 0,
                             ServiceLimits(**settings)).start()  # fmt: skip
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def dit(bundles):
    with make_server(Bundle.load(bundles.dit, threads=1), "127.0.0.1", 0, LIMITS).start() as s:
        yield s


@pytest.fixture(scope="module")
def st(bundles):
    with make_server(Bundle.load(bundles.st, threads=1), "127.0.0.1", 0, LIMITS).start() as s:
        yield s


def get(port: int, path: str) -> Reply:
    return exchange(port, request("GET", path, headers="Connection: close\r\n"))


def predict_body(bundle_meta: dict, label: str, cells: int = 3, seed: int = 0) -> dict:
    genes = bundle_meta["genes"]["gene_key"]
    counts = np.random.default_rng(seed).poisson(2.0, (cells, len(genes)))
    return {"controls": {"counts": counts.tolist(),
                         "cell_type": bundle_meta["prediction"]["cell_types"][0]},
            "perturbations": [label], "unseen": "generic", "seed": seed}  # fmt: skip


# -- what works -------------------------------------------------------------------------------


def test_generate_over_http(dit, bundles):
    assert dit.url.startswith("http://127.0.0.1:")
    health = get(dit.port, "/health")
    assert health.status == 200 and health.json()["kind"] == "generation"
    assert health.json()["mlflow_run_id"] and len(health.headers["x-request-id"]) == 16
    body = {"n": 3, "conditions": {"cell_type": "*"}, "seed": 5}
    reply = post(dit.port, "/generate", body)
    assert reply.status == 200
    counts = np.asarray(reply.json()["counts"])
    assert counts.shape == (6, len(reply.json()["genes"])) and counts.sum() > 0
    assert sorted(set(reply.json()["obs"]["cell_type"])) == sorted(
        bundles.meta["dit"]["generation"]["conditions"]["categories"]["cell_type"]
    )
    assert post(dit.port, "/generate", body).json() == reply.json()  # seeded: the same cells
    genes = get(dit.port, "/genes").json()
    assert genes["gene_key"] == reply.json()["genes"]
    assert "genes" not in get(dit.port, "/metadata").json()


def test_predict_over_http(st, runs, bundles):
    body = predict_body(bundles.meta["st"], runs.held, cells=5)
    reply = post(st.port, "/predict", body)
    counts = np.asarray(body["controls"]["counts"])
    assert reply.status == 200, reply.body[:300]
    assert np.asarray(reply.json()["predictions"][runs.held]).shape == counts.shape
    keys = bundles.meta["st"]["genes"]["gene_key"]
    order = np.random.default_rng(1).permutation(len(keys))  # columns named in another order
    shuffled = dict(body, controls=dict(body["controls"], counts=counts[:, order].tolist(),
                                        genes=[keys[i] for i in order]))  # fmt: skip
    again = post(st.port, "/predict", shuffled).json()  # answered in the client's columns
    assert again["genes"] == [keys[i] for i in order]
    np.testing.assert_array_equal(np.asarray(again["predictions"][runs.held]),
                                  np.asarray(reply.json()["predictions"][runs.held])[:, order])  # fmt: skip


def test_the_service_logic_runs_without_http(bundles, runs):
    service = BundleService(Bundle.load(bundles.st, threads=1))
    body = predict_body(bundles.meta["st"], runs.held)
    assert set(service.predict(body)["predictions"]) == {runs.held}
    with pytest.raises(DataValidationError, match="controls.counts"):
        service.predict(dict(body, controls={"counts": [[1.5, True]]}))
    with pytest.raises(DataValidationError, match="cannot generate"):
        service.generate({"n": 1})


@pytest.mark.parametrize("value", ["nan", "-Infinity", "1e999", "late"])
def test_a_continuous_condition_must_be_a_finite_number(bundles, value):
    """The model layer refuses it (``models/conditions.py``); the service names the field.
    The test bundle has no continuous condition, so its condition space gets one."""
    service = BundleService(Bundle.load(bundles.dit, threads=1))
    space = service.generator.space
    service.generator.space = dataclasses.replace(
        space, continuous=("time",), continuous_mean=(0.0,), continuous_std=(1.0,)
    )
    with pytest.raises(DataValidationError) as err:
        service.generate({"n": 1, "conditions": {"time": value}})
    assert (err.value.path, err.value.field) == ("request", "conditions")
    assert err.value.problem.startswith("time: needs a") and err.value.fix


# -- JSON types, checked strictly ----------------------------------------------------------------

HUGE = 10**30
GENERATE_CASES = [  # (body, the field the 400 names)
    ({"n": 0}, "n"),
    ({"n": -3}, "n"),
    ({"n": MAX_CELLS + 1}, "n"),
    ({"n": True}, "n"),
    ({"n": 1.0}, "n"),
    ({"n": "5"}, "n"),
    ({"n": None}, "n"),
    ({"n": [5]}, "n"),
    ({"n": HUGE}, "n"),
    ({}, "n"),
    ({"n": 1, "steps": 0}, "steps"),
    ({"n": 1, "steps": -3}, "steps"),
    ({"n": 1, "steps": 10**7}, "steps"),
    ({"n": 1, "steps": False}, "steps"),
    ({"n": 1, "steps": 2.5}, "steps"),
    ({"n": 1, "guidance": -1}, "guidance"),
    ({"n": 1, "guidance": 1e308}, "guidance"),
    ({"n": 1, "guidance": True}, "guidance"),
    ({"n": 1, "guidance": "2"}, "guidance"),
    ({"n": 1, "seed": -1}, "seed"),
    ({"n": 1, "seed": 2**32}, "seed"),
    ({"n": 1, "seed": 1.5}, "seed"),
    ({"n": 1, "seed": None}, "seed"),
    ({"n": 1, "conditions": None}, "conditions"),
    ({"n": 1, "conditions": ["cell_type", "B"]}, "conditions"),
    ({"n": 1, "conditions": "cell_type=B"}, "conditions"),
    ({"n": 1, "conditions": {"cell_type": 3}}, "conditions.cell_type"),
    ({"n": 1, "conditions": {"cell_type": None}}, "conditions.cell_type"),
    ({"n": 1, "conditions": {"cell_type": ""}}, "conditions.cell_type"),
    ({"n": 1, "conditions": {"cell_type": "x" * 5000}}, "conditions.cell_type"),
    ({"n": 1, "conditions": {"cell_type": "neuron"}}, "conditions"),
    ({"n": 1, "conditions": {"no_such_column": "B"}}, "conditions"),
    ({"n": 1, "conditions": {"": "B"}}, "conditions (a key)"),
    ({"n": MAX_CELLS, "conditions": {"cell_type": "*"}}, "n"),  # x 2 cell types
    ({"n": 1, "extra": 1}, "body"),
    ({"n": 1, "N": 1}, "body"),
]


@pytest.mark.parametrize(("body", "field_"), GENERATE_CASES)
def test_bad_generate_requests_name_the_field(dit, body, field_):
    assert_error(post(dit.port, "/generate", body), 400, field_)


def _controls(counts=None, **extra) -> dict:
    return {"counts": [[1, 2]] if counts is None else counts, **extra}


PREDICT_CASES = [  # (body, field); the bundle's gene count is unknown here, so counts that
    # pass the schema fail on the column count, which is checked after it
    ({"perturbations": ["A"]}, "controls"),
    ({"controls": _controls()}, "perturbations"),
    ({"controls": None, "perturbations": ["A"]}, "controls"),
    ({"controls": [[1, 2]], "perturbations": ["A"]}, "controls"),
    ({"controls": {}, "perturbations": ["A"]}, "controls.counts"),
    ({"controls": _controls(genes=None), "perturbations": ["A"]}, "controls.genes"),
    ({"controls": _controls(genes="ENSG1"), "perturbations": ["A"]}, "controls.genes"),
    ({"controls": _controls(genes=["g", "g"]), "perturbations": ["A"]}, "controls.genes"),
    ({"controls": _controls(genes=["g", 7]), "perturbations": ["A"]}, "controls.genes[1]"),
    ({"controls": _controls(genes=["a", "b", "c"]), "perturbations": ["A"]}, "controls.genes"),
    ({"controls": _controls(counts=[]), "perturbations": ["A"]}, "controls.counts"),
    ({"controls": _controls(counts=[[]]), "perturbations": ["A"]}, "controls.counts[0]"),
    ({"controls": _controls(counts=[1, 2]), "perturbations": ["A"]}, "controls.counts[0]"),
    ({"controls": _controls(counts=[[1, 2], [1]]), "perturbations": ["A"]}, "controls.counts[1]"),
    ({"controls": _controls(counts=[[1, True]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts=[[1, "2"]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts=[[1, None]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts=[[1, -1]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts=[[1, 1e300]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts=[[1, 10**400]]), "perturbations": ["A"]}, "controls.counts"),
    ({"controls": _controls(counts=[[1, [2]]]), "perturbations": ["A"]}, "controls.counts[0][1]"),
    ({"controls": _controls(counts="[[1]]"), "perturbations": ["A"]}, "controls.counts"),
    (
        {"controls": _controls(counts=[[0]] * (MAX_CELLS + 1)), "perturbations": ["A"]},
        "controls.counts",
    ),  # fmt: skip
    ({"controls": _controls(cell_type=5), "perturbations": ["A"]}, "controls.cell_type"),
    ({"controls": _controls(other=1), "perturbations": ["A"]}, "controls"),
    ({"controls": _controls(), "perturbations": []}, "perturbations"),
    ({"controls": _controls(), "perturbations": "A"}, "perturbations"),
    ({"controls": _controls(), "perturbations": ["A", "A"]}, "perturbations"),
    ({"controls": _controls(), "perturbations": [None]}, "perturbations[0]"),
    ({"controls": _controls(), "perturbations": [""]}, "perturbations[0]"),
    ({"controls": _controls(), "perturbations": ["A"], "unseen": "maybe"}, "unseen"),
    ({"controls": _controls(), "perturbations": ["A"], "unseen": True}, "unseen"),
    ({"controls": _controls(), "perturbations": ["A"], "seed": -1}, "seed"),
    ({"controls": _controls(), "perturbations": ["A"], "seed": "0"}, "seed"),
    ({"controls": _controls(), "perturbations": ["A"], "steps": 5}, "body"),
    ({"controls": _controls(), "perturbations": ["A"]}, "controls.counts"),  # 2 of G columns
]


@pytest.mark.parametrize(("body", "field_"), PREDICT_CASES)
def test_bad_predict_requests_name_the_field(st, body, field_):
    assert_error(post(st.port, "/predict", body), 400, field_)


def test_bad_requests_that_depend_on_the_model(st, runs, bundles):
    meta = bundles.meta["st"]
    body = predict_body(meta, runs.held)
    for controls, field_ in [
        (dict(body["controls"], cell_type="neuron"), "controls.cell_type"),
        ({"counts": body["controls"]["counts"]}, "controls.cell_type"),  # the model needs it
        (
            dict(body["controls"], genes=meta["genes"]["gene_key"][::-1][:-1] + ["other"]),
            "controls.genes",
        ),  # fmt: skip
    ]:
        assert_error(post(st.port, "/predict", dict(body, controls=controls)), 400, field_)
    error = assert_error(post(st.port, "/predict", dict(body, unseen="error")), 400)
    assert error["field"] == "perturbations" and "generic" in error["fix"]
    assert post(st.port, "/predict", dict(body, perturbations=["NOT_A_GENE"])).status == 200


# -- JSON itself -----------------------------------------------------------------------------------

BODIES = {
    "empty": b"",
    "whitespace": b"  \n ",
    "not UTF-8": b'{"n": 1, "x": "\xff\xfe"}',
    "latin-1": '{"n": 1, "c": "é"}'.encode("latin-1"),
    "UTF-16": '{"n": 1}'.encode("utf-16"),
    "UTF-8 BOM": b'\xef\xbb\xbf{"n": 1}',
    "NaN": b'{"n": 1, "guidance": NaN}',
    "Infinity": b'{"n": 1, "guidance": Infinity}',
    "-Infinity": b'{"n": 1, "guidance": -Infinity}',
    "duplicate key": b'{"n": 1, "n": 2}',
    "nested duplicate": b'{"n": 1, "conditions": {"a": "1", "a": "2"}}',
    "deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
    "deep inside": b'{"n": 1, "conditions": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "5000-digit int": b'{"n": ' + b"9" * 5000 + b"}",
    "truncated": b'{"n": 1, "conditions": {"cell',
    "trailing garbage": b'{"n": 1} {"n": 2}',
    "single quotes": b"{'n': 1}",
    "array": b"[1, 2]",
    "string": b'"n"',
    "number": b"5",
    "null": b"null",
    "true": b"true",
    "control char": b'{"n": 1, "c": "\x01"}',
    "lone surrogate": b'{"n": 1, "conditions": {"cell_type": "\\ud800"}}',
}


@pytest.mark.parametrize("name", list(BODIES))
def test_bodies_that_are_not_a_json_object_are_400(dit, name):
    payload = assert_error(post(dit.port, "/generate", BODIES[name]), 400)
    assert payload["field"].startswith(("body", "conditions"))


@pytest.mark.parametrize("name", ["not UTF-8", "NaN", "duplicate key", "deep arrays", "array"])
def test_parse_json_object_without_http(name):
    with pytest.raises(DataValidationError, match="body"):
        parse_json_object(BODIES[name])


# -- HTTP itself ------------------------------------------------------------------------------------

H = "Host: test\r\n"
RAW = {  # (raw request bytes, the status)
    "garbage line": (b"GARBAGE\r\n\r\n", 400),
    "NUL bytes": (b"\x00\x01\x02\x03\r\n\r\n", 400),
    "TLS hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 404),  # h11 reads PRI *
    "no version": (f"GET /health\r\n{H}\r\n".encode(), 400),
    "bad version": (f"GET /health HTTP/9.9\r\n{H}\r\n".encode(), 200),  # h11 answers 1.1
    "no Host": (b"GET /health HTTP/1.1\r\n\r\n", 400),
    "space in target": (f"GET /hea lth HTTP/1.1\r\n{H}\r\n".encode(), 400),
    "non-ASCII target": (b"GET /h\xc3\xa9alth HTTP/1.1\r\n" + H.encode() + b"\r\n", 400),
    "header without colon": (f"GET /health HTTP/1.1\r\n{H}Bad header\r\n\r\n".encode(), 400),
    "space before colon": (f"GET /health HTTP/1.1\r\n{H}X-A : 1\r\n\r\n".encode(), 400),
    "NUL in header": (f"GET /health HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\n".encode(), 400),
    # h11 refuses a head that is still incomplete past 16 KiB; these arrive in two reads
    "one huge header": (
        [f"GET /health HTTP/1.1\r\n{H}X-A: {'a' * 20000}".encode(), b"\r\n\r\n"],
        400,
    ),
    "header flood": (
        [
            f"GET /health HTTP/1.1\r\n{H}".encode()
            + b"".join(b"X-%d: v\r\n" % i for i in range(3000)),
            b"\r\n",
        ],
        400,
    ),  # fmt: skip
    "long target": ([f"GET /{'a' * 20000}".encode(), f" HTTP/1.1\r\n{H}\r\n".encode()], 400),
    "Content-Length abc": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: abc\r\n\r\n".encode(),
        400,
    ),
    "Content-Length -1": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: -1\r\n\r\n".encode(),
        400,
    ),
    "Content-Length 1.5": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: 1.5\r\n\r\n".encode(),
        400,
    ),
    "two Content-Lengths": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: 2\r\nContent-Length: 8\r\n\r\n{{}}".encode(),
        400,
    ),
    "Content-Length list": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: 2, 8\r\n\r\n{{}}".encode(),
        400,
    ),
    "Content-Length and chunked": (
        f"POST /generate HTTP/1.1\r\n{H}Content-Length: 2\r\nTransfer-Encoding: chunked"
        "\r\n\r\n2\r\n{}\r\n0\r\n\r\n".encode(),
        400,
    ),
    "unknown Transfer-Encoding": (
        f"POST /generate HTTP/1.1\r\n{H}Transfer-Encoding: gzip\r\n\r\n{{}}".encode(),
        400,
    ),
    "bad chunk size": (
        f"POST /generate HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n".encode(),
        400,
    ),
    "no Content-Length": (f"POST /generate HTTP/1.1\r\n{H}Connection: close\r\n\r\n".encode(), 400),
    "Content-Length 0": (f"POST /generate HTTP/1.1\r\n{H}Content-Length: 0\r\n\r\n".encode(), 400),
    "chunked, fine": (
        f"POST /generate HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
        '5\r\n{"n":\r\n3\r\n 0}\r\n0\r\n\r\n'.encode(),
        400,  # a valid chunked body whose n is 0
    ),
    "HTTP/1.0": (b"GET /health HTTP/1.0\r\n\r\n", 200),
    "absolute-form target": (f"GET http://test/health HTTP/1.1\r\n{H}\r\n".encode(), 404),
    "asterisk target": (f"OPTIONS * HTTP/1.1\r\n{H}\r\n".encode(), 404),
    "query string": (f"GET /health?x=1&y=%ff HTTP/1.1\r\n{H}\r\n".encode(), 200),
    "lowercase method": (f"get /health HTTP/1.1\r\n{H}\r\n".encode(), 405),
    "made-up method": (f"BREW /health HTTP/1.1\r\n{H}\r\n".encode(), 405),
    "websocket upgrade": (
        f"GET /health HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode(),
        200,
    ),
    "garbage Host": (b"GET /health HTTP/1.1\r\nHost: [::bad\r\n\r\n", 200),
}


@pytest.mark.parametrize("name", list(RAW))
def test_malformed_http_gets_a_status_and_json(dit, name):
    raw, status = RAW[name]
    reply = exchange(dit.port, *([raw] if isinstance(raw, bytes) else raw), pause=0.2)
    if status == 200:
        assert reply.status == 200 and reply.json()["status"] == "ok"
    else:
        assert_error(reply, status)


ROUTES = {"/health": "GET", "/metadata": "GET", "/genes": "GET", "/generate": "POST",
          "/predict": "POST"}  # fmt: skip


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                                    "TRACE", "CONNECT"])  # fmt: skip
@pytest.mark.parametrize("path", [*ROUTES, "/", "/nowhere", "/health/", "//health", "/HEALTH",
                                  "/generate/../health", "/%2e%2e/etc/passwd"])  # fmt: skip
def test_every_method_on_every_path(dit, method, path):
    reply = exchange(dit.port, request(method, path, b"", "Connection: close\r\n"))
    want = ROUTES.get(path)
    if method == "HEAD":  # the same status and headers as GET, no body
        assert reply.status == (404 if want is None else 200 if want == "GET" else 405)
        assert reply.headers["content-type"] == "application/json" and not reply.body
    elif want is None:
        assert_error(reply, 404, "path")
    elif method == want:
        assert reply.status in (200, 400) and reply.json()  # an empty POST body is a 400
    else:
        payload = assert_error(reply, 405, "method")
        assert want in reply.headers["allow"] and want in payload["fix"]


# -- sizes, time, load, bugs --------------------------------------------------------------------------


def test_bodies_above_the_cap_are_413(start, bundles):
    server = start(bundles.dit, max_body_bytes=4096)
    declared = request("POST", "/generate", None, "Content-Length: 5000\r\n")  # nothing sent
    payload = assert_error(exchange(server.port, declared), 413, "body")
    assert "5000" in payload["error"]
    huge = request("POST", "/generate", None, f"Content-Length: {10**30}\r\n")
    assert_error(exchange(server.port, huge), 400, "request")  # h11 refuses it first
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"  # 1 KiB chunks, no Content-Length
    chunked = request("POST", "/generate", None, "Transfer-Encoding: chunked\r\n")
    reply = exchange(server.port, chunked + chunk * 6 + b"0\r\n\r\n")
    assert_error(reply, 413, "body")
    assert reply.headers["connection"] == "close"
    assert post(server.port, "/generate", {"n": 1, "steps": 2}).status == 200  # still serving


def test_slow_heads_and_bodies_get_408(dit):
    start = time.monotonic()
    replies = {}

    def slow(name, *parts, pause):
        replies[name] = exchange(dit.port, *parts, pause=pause, timeout=10)

    partial_body = request("POST", "/generate", None, "Content-Length: 100\r\n") + b'{"n": 1'
    trickle = [request("POST", "/generate", None, "Content-Length: 40\r\n")] + [b" "] * 39
    threads = [
        threading.Thread(target=slow, args=("stops mid-body", partial_body), kwargs={"pause": 0}),
        threading.Thread(
            target=slow, args=("trickles the body", *trickle), kwargs={"pause": 0.1}
        ),  # fmt: skip
        threading.Thread(
            target=slow,
            args=("stops mid-head", b"POST /generate HTTP/1.1\r\nHo"),
            kwargs={"pause": 0},
        ),  # fmt: skip
        threading.Thread(
            target=slow,
            args=("trickles the head", *[b"G", b"E", b"T", b" "] * 10),
            kwargs={"pause": 0.1},
        ),  # fmt: skip
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_error(replies["stops mid-body"], 408, "body")
    assert_error(replies["trickles the body"], 408, "body")
    assert_error(replies["stops mid-head"], 408, "request")
    assert_error(replies["trickles the head"], 408, "request")
    assert time.monotonic() - start < 8  # each deadline is 1 s
    with socket.create_connection(("127.0.0.1", dit.port)) as idle:  # no request: closed
        assert read_reply(idle, timeout=8).status is None


def test_a_busy_server_answers_503_and_health_still_answers(start, bundles, monkeypatch):
    computing, release = threading.Event(), threading.Event()

    def slow_generate(self, body):
        computing.set()
        release.wait(30)
        return {"done": body["n"]}

    monkeypatch.setattr(BundleService, "generate", slow_generate)
    server = start(bundles.dit, concurrency=1, queue=0)
    first = {}
    worker = threading.Thread(
        target=lambda: first.update(reply=post(server.port, "/generate", {"n": 1}))
    )
    worker.start()
    try:
        assert computing.wait(10)
        busy = assert_error(post(server.port, "/generate", {"n": 2}), 503)
        assert "busy" in busy["error"]
        assert get(server.port, "/health").status == 200  # the event loop never blocks
    finally:
        release.set()
        worker.join(30)
    assert first["reply"].status == 200 and first["reply"].json() == {"done": 1}
    assert post(server.port, "/generate", {"n": 3}).json() == {"done": 3}


def test_a_bug_is_a_500_with_a_request_id_and_the_traceback_only_in_the_log(
    start, bundles, monkeypatch, caplog
):
    def broken(self, body):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(BundleService, "generate", broken)
    server = start(bundles.dit)
    with caplog.at_level(logging.ERROR, logger="latentcell.export.service"):
        reply = post(server.port, "/generate", {"n": 1})
    payload = assert_error(reply, 500)
    assert payload["request_id"] == reply.headers["x-request-id"]
    assert b"secret" not in reply.body and b"Traceback" not in reply.body
    [record] = [r for r in caplog.records if payload["request_id"] in r.getMessage()]
    assert record.exc_info and "secret internal detail" in str(record.exc_info[1])
    assert get(server.port, "/health").status == 200


def test_limits_are_checked():
    with pytest.raises(DataValidationError, match="max-body-bytes"):
        ServiceLimits(max_body_bytes=0)
    with pytest.raises(DataValidationError, match="read-timeout"):
        ServiceLimits(read_timeout_s=-1.0)


def test_anything_that_escapes_the_app_is_still_a_json_500(caplog):
    """The outermost layer answers even when the failure happens outside Starlette's own
    error handling (no server needed: one ASGI call)."""

    async def broken(scope, receive, send):
        raise RuntimeError("escaped")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    with caplog.at_level(logging.ERROR, logger="latentcell.export.service"):
        asyncio.run(Edge(broken, 100)(scope, receive, send))
    assert sent[0]["status"] == 500
    payload = json.loads(sent[1]["body"])
    assert payload["request_id"] == scope["latentcell.request_id"] and "escaped" not in str(payload)
    assert any(r.exc_info and payload["request_id"] in r.getMessage() for r in caplog.records)
