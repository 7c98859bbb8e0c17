"""A bounded fuzz of the HTTP service on loopback: a few hundred malformed or hostile
requests of many kinds, from a fixed seed, against real uvicorn servers for a generation and
a prediction bundle. Each must get a status line and a JSON error body (or a 200 when the
mutation happens to be valid); none may get a 500 or take the server down: ``/health``
answers at the end. The counts by status are printed (``pytest -s``) and checked for variety.
"""

from __future__ import annotations

import copy
import json
import random
import threading
from collections import Counter

import pytest

from latentcell.export.runtime import Bundle
from latentcell.export.runtime.service import ServiceLimits, make_server

from .test_service import Reply, exchange, request

SEED = 20_240_611
LIMITS = ServiceLimits(read_timeout_s=1.0, max_body_bytes=256 * 1024, queue=64)
H = b"Host: fuzz\r\n"

HOSTILE = [None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63, 2**64 + 1, 10**30, 1e308, -1e308,
           "", "x", "1", "NaN", "\u0000", "é" * 3, "x" * 3000, [], {}, [1], {"a": 1},
           [[[[[[[[[[1]]]]]]]]]], ["a", None]]  # fmt: skip


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return request("POST", path, body, "Connection: close\r\n" + extra.decode("latin-1"))


def json_mutations(rng: random.Random, base: dict, path: str, count: int) -> list[bytes]:
    """``count`` hostile variants of the valid request ``base``, as whole HTTP requests."""

    def nested_keys(obj, prefix=()):
        for key, value in obj.items():
            yield (*prefix, key)
            if isinstance(value, dict):
                yield from nested_keys(value, (*prefix, key))

    keys = list(nested_keys(base))
    text = _json(base)
    out: list[bytes] = []
    while len(out) < count:
        kind = rng.randrange(12)
        body = copy.deepcopy(base)
        if kind <= 3:  # a hostile value at any depth
            *parents, key = rng.choice(keys)
            target = body
            for p in parents:
                target = target[p]
            target[key] = rng.choice(HOSTILE)
            raw = _json(body)
        elif kind == 4:  # one element of a list replaced
            lists = [k for k in keys if isinstance(_get(body, k), list) and _get(body, k)]
            if not lists:
                continue
            value = _get(body, rng.choice(lists))
            inner = value[rng.randrange(len(value))] if isinstance(value[0], list) else value
            inner[rng.randrange(len(inner))] = rng.choice(HOSTILE)
            raw = _json(body)
        elif kind == 5:  # a key dropped or an unknown one added
            *parents, key = rng.choice(keys)
            target = body
            for p in parents:
                target = target[p]
            if rng.random() < 0.5:
                del target[key]
            else:
                target[f"x{rng.randrange(100)}"] = rng.choice(HOSTILE)
            raw = _json(body)
        elif kind == 6:  # NaN / Infinity literals, or a duplicate key
            literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
            raw = rng.choice([
                text[:-1] + b', "seed": ' + literal + b"}",
                text[:-1] + b', "' + rng.choice(keys)[0].encode() + b'": 1}',
            ])  # fmt: skip
        elif kind == 7:  # cut short, or garbage after
            raw = rng.choice([text[: rng.randrange(1, len(text))], text + b"]}", text + text])
        elif kind == 8:  # bytes that are not UTF-8, or a byte order mark
            at = rng.randrange(len(text))
            bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00"])
            raw = text[:at] + bad + text[at:]
        elif kind == 9:  # the body is not an object
            raw = rng.choice([b"[" + text + b"]", b"null", b"true", b"42", b'"body"', b"[]"])
        elif kind == 10:  # deep nesting, inside or as the whole body
            depth = rng.choice([500, 5_000, 50_000])
            deep = b"[" * depth + b"]" * depth
            raw = rng.choice([deep, text[:-1] + b', "deep": ' + deep + b"}"])
        else:  # random byte flips
            raw = bytearray(text)
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw)
        out.append(_post(path, raw))
    return out


def _get(obj, keys):
    for k in keys:
        obj = obj[k]
    return obj


def raw_http_cases(rng: random.Random, count: int) -> list[bytes]:
    """``count`` requests that are broken at the HTTP level, or aimed at the wrong place."""
    body = b'{"n": 1}'
    templates = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\r\n\r\n",
        lambda: b"GET /health HTTP/1.1\r\n\r\n",  # no Host
        lambda: (
            b"GET /health HTTP/"
            + rng.choice([b"0.9", b"1", b"x.y", b"1.1.1"])
            + b"\r\n"
            + H
            + b"\r\n"
        ),
        lambda: (
            b"GET "
            + rng.choice([b"", b"health", b"/h\x7fx", b"/\xff"])
            + b" HTTP/1.1\r\n"
            + H
            + b"\r\n"
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n"
            + H
            + b"Content-Length: "
            + rng.choice([b"abc", b"-1", b"1.5", b"0x10", b" ", b"1 1", b"99999999999999999999999"])
            + b"\r\n\r\n"
            + body
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n"
            + H
            + b"Content-Length: 8\r\nContent-Length: "
            + str(rng.randrange(9, 99)).encode()
            + b"\r\n\r\n"
            + body
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n" + H + b"Content-Length: 8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n8\r\n" + body + b"\r\n0\r\n\r\n"
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n"
            + H
            + b"Transfer-Encoding: "
            + rng.choice([b"gzip", b"chunked, gzip", b"identity", b"chunked\x00"])
            + b"\r\n\r\n"
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n"
            + H
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + rng.choice([b"zz\r\n", b"-1\r\n", b"8;\x00\r\n", b"ffffffffffffffffff\r\n"])
            + body
            + b"\r\n0\r\n\r\n"
        ),
        lambda: (
            b"GET /health HTTP/1.1\r\n"
            + H
            + rng.choice(
                [
                    b"Bad header\r\n",
                    b"X : 1\r\n",
                    b"X: a\x00b\r\n",
                    b": empty\r\n",
                    b" folded: 1\r\n",
                    b"X\x7f: 1\r\n",
                ]
            )
            + b"\r\n"
        ),  # fmt: skip
        lambda: (
            rng.choice(
                [
                    b"get",
                    b"BREW",
                    b"G-E-T",
                    b"DELETE",
                    b"TRACE",
                    b"PATCH",
                    b"OPTIONS",
                    b"PUT",
                    b"CONNECT",
                ]
            )
            + b" "
            + rng.choice(
                [
                    b"/health",
                    b"/generate",
                    b"/predict",
                    b"/nope",
                    b"*",
                    b"/%2e%2e/%2e%2e/etc/passwd",
                    b"//health",
                    b"/health/",
                ]
            )
            + b" HTTP/1.1\r\n"
            + H
            + b"Content-Length: 0\r\n\r\n"
        ),  # fmt: skip
        lambda: (
            b"GET /health HTTP/1.1\r\nHost: "
            + rng.choice([b"[::bad", b"a" * 3000, b""])
            + b"\r\n\r\n"
        ),
        lambda: (
            b"POST /generate HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
            b"Content-Length: " + str(rng.choice([8, 10**9])).encode() + b"\r\n\r\n" + body
        ),
        lambda: b"GET /health HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n",  # bare LF
        lambda: (
            b"POST /generate HTTP/1.1\r\n" + H + b"Content-Type: text/plain\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        ),  # valid
    ]
    return [rng.choice(templates)() for _ in range(count)]


@pytest.fixture(scope="module")
def servers(bundles):
    started = [make_server(Bundle.load(b, threads=1), "127.0.0.1", 0, LIMITS).start()
               for b in (bundles.dit, bundles.st)]  # fmt: skip
    yield started
    for server in started:
        server.shutdown()


def check(reply: Reply, what: bytes) -> None:
    where = what[:120]
    assert reply.status is not None, f"no status line for {where!r}"
    assert reply.status in (200, 400, 404, 405, 408, 413), (reply.status, where, reply.body)
    assert reply.headers.get("content-type") == "application/json", (where, reply.headers)
    if not what.startswith(b"HEAD "):
        payload = json.loads(reply.body)
        if reply.status != 200:
            assert payload["error"] and payload["field"] and payload["fix"], payload


def test_fuzz_every_request_gets_a_status_and_json_and_the_server_lives(servers, bundles):
    rng = random.Random(SEED)
    dit, st = servers
    meta = bundles.meta["st"]
    n_genes = len(meta["genes"]["gene_key"])
    generate = {"n": 1, "conditions": {"cell_type": "*"}, "steps": 2, "guidance": 1.5, "seed": 3}
    predict = {"controls": {"counts": [[rng.randrange(5) for _ in range(n_genes)]
                                       for _ in range(2)],
                            "cell_type": meta["prediction"]["cell_types"][0]},
               "perturbations": [meta["prediction"]["labels"][-1]], "unseen": "generic",
               "seed": 1}  # fmt: skip
    cases = [(dit, r) for r in json_mutations(rng, generate, "/generate", 110)]
    cases += [(st, r) for r in json_mutations(rng, predict, "/predict", 70)]
    cases += [(rng.choice(servers), r) for r in raw_http_cases(rng, 80)]
    counts: Counter[int | None] = Counter()
    for server, raw in cases:
        reply = exchange(server.port, raw, timeout=15)
        check(reply, raw)
        counts[reply.status] += 1

    # slow clients, in parallel: heads and bodies that stop or trickle past the deadline
    slow = [
        (dit, [b"POST /generate HTTP/1.1\r\n" + H + b'Content-Length: 50\r\n\r\n{"n"'], 0),
        (
            st,
            [b"POST /predict HTTP/1.1\r\n" + H + b"Content-Length: 30\r\n\r\n"] + [b" "] * 29,
            0.1,
        ),  # fmt: skip
        (dit, [b"GET /health HTTP/1.1\r\nHo"], 0),
        (st, [b"G", b"E", b"T", b" ", b"/"] * 8, 0.1),
    ]
    replies: dict[int, Reply] = {}

    def run(i, server, parts, pause):
        replies[i] = exchange(server.port, *parts, pause=pause, timeout=15)

    threads = [threading.Thread(target=run, args=(i, *c)) for i, c in enumerate(slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, (_, parts, _) in enumerate(slow):
        check(replies[i], parts[0])
        assert replies[i].status == 408
        counts[replies[i].status] += 1

    total = sum(counts.values())
    print(f"\nfuzz: {total} requests, by status {dict(sorted(counts.items()))}")
    assert total >= 200
    assert {400, 404, 405, 408, 413} <= set(counts) and counts[400] > total / 2
    for server in servers:
        health = exchange(server.port, request("GET", "/health"))
        assert health.status == 200 and health.json()["status"] == "ok"
