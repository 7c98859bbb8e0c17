"""Stores read from URLs (``remote``): a real HTTP server on loopback, and S3 through moto.

Each store is built locally, served read-only, and read back through its URL; every cell must
equal the local read, damage must be caught as it is locally, and a missing store must be one
clear line naming the URL.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.errors import CorruptDataError, DataValidationError
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
from latentcell.data_pipelines.stores import open_store, verify_store
from latentcell.launch.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops concurrent connections (1 s retries)
    daemon_threads = True


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output stays readable
        pass


@pytest.fixture(scope="module")
def served(small_store, tmp_path_factory):
    """A directory holding a Zarr and a WebDataset store, served at a loopback URL; yields
    (directory, base URL)."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(small_store, root / "cells.zarr")
    build_store(
        [small_store.parent / "cells.h5ad"], root / "cells.wds", format="webdataset",
        schema="vcc", block_cells=128, cells_per_shard=512,
    )  # fmt: skip
    server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _same_blocks(a, b) -> None:
    assert a.X.shape == b.X.shape and (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.library_size, b.library_size)
    assert a.codes.keys() == b.codes.keys()
    for col in a.codes:
        np.testing.assert_array_equal(a.codes[col], b.codes[col])
    if a.names is not None or b.names is not None:
        np.testing.assert_array_equal(a.names, b.names)


@pytest.mark.parametrize("name", ["cells.zarr", "cells.wds"])
def test_every_cell_over_http_equals_the_local_read(served, name):
    root, base = served
    local, remote = open_store(root / name, names=True), open_store(f"{base}/{name}", names=True)
    assert remote.meta.n_cells == local.meta.n_cells
    np.testing.assert_array_equal(remote.meta.unit_sizes, local.meta.unit_sizes)
    for unit in range(len(local.meta.unit_sizes)):
        _same_blocks(remote.read_unit(unit), local.read_unit(unit))
    _same_blocks(remote.read_rows(150, 777), local.read_rows(150, 777))
    assert remote.group_index().equals(local.group_index())
    assert verify_store(f"{base}/{name}") == []


def _stream(source, **kw) -> list[dict]:
    config = CellStreamConfig(batch_size=64, seed=3, buffer_units=3, **kw)
    return list(CellStream(source, config, rank=0, world_size=1).loader())


@pytest.mark.parametrize("name", ["cells.zarr", "cells.wds"])
def test_cell_stream_over_http_equals_the_local_stream(served, name):
    """Read-ahead (``fetch_units``) changes when units are read, never which cells come out."""
    root, base = served
    local = _stream(open_store(root / name))
    for fetch_units in (None, 3):  # None: the remote default
        remote = _stream(open_store(f"{base}/{name}"), fetch_units=fetch_units)
        assert len(remote) == len(local)
        for a, b in zip(remote, local, strict=True):
            assert a["row"].tolist() == b["row"].tolist()
            assert (a["X"].to_dense() == b["X"].to_dense()).all()
            assert a["is_pad"].tolist() == b["is_pad"].tolist()


def test_set_sampler_over_http_equals_local(served):
    root, base = served
    config = SetSamplerConfig(set_size=16, tail="partial", seed=2)
    local = list(SetSampler(open_store(root / "cells.zarr"), config, rank=0, world_size=1))
    remote = list(SetSampler(open_store(f"{base}/cells.zarr"), config, rank=0, world_size=1))
    assert [p["perturbed"]["row"].tolist() for p in remote] == [
        p["perturbed"]["row"].tolist() for p in local
    ]


@pytest.fixture
def damaged(served, tmp_path):
    """A served copy of both stores (the test damages it), and its base URL."""
    root, base = served
    target = root / f"damaged-{tmp_path.name}"
    shutil.copytree(root / "cells.zarr", target / "cells.zarr")
    shutil.copytree(root / "cells.wds", target / "cells.wds")
    yield target, f"{base}/{target.name}"
    shutil.rmtree(target)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_served_over_http_is_caught(damaged):
    target, base = damaged
    _flip(target / "cells.zarr" / "X" / "data" / "c" / "0", 10)
    _flip(target / "cells.wds" / "shard-000001.tar", 700)
    reader = open_store(f"{base}/cells.zarr")
    with pytest.raises(CorruptDataError, match=r"cells\.zarr/X/data/c/0: crc32c") as err:
        reader.read_unit(0)
    assert str(err.value).startswith("http://127.0.0.1:")
    with pytest.raises(CorruptDataError, match=r"shard-000001\.tar: crc32c"):
        open_store(f"{base}/cells.wds").read_unit(1)
    assert any("X/data: checksum mismatch" in p for p in verify_store(f"{base}/cells.zarr"))
    assert any("shard-000001.tar: checksum" in p for p in verify_store(f"{base}/cells.wds"))
    # on_corrupt="skip" works the same over a URL
    config = CellStreamConfig(batch_size=64, on_corrupt="skip", tail="partial")
    stream = CellStream(open_store(f"{base}/cells.wds"), config, rank=0, world_size=1).loader()
    assert sum(int((~b["is_pad"]).sum()) for b in stream) == 1200 - 512
    assert [u["file"].endswith("shard-000001.tar") for u in stream.corrupt_units()] == [True]


def test_an_edited_manifest_served_over_http_is_caught(damaged):
    target, base = damaged
    mpath = target / "cells.zarr" / "manifest.json"
    mpath.write_text(mpath.read_text().replace('"n_cells": 1200', '"n_cells": 1100'))
    with pytest.raises(CorruptDataError, match="manifest_sha256"):
        open_store(f"{base}/cells.zarr")


def test_a_missing_chunk_over_http_is_damage(damaged):
    target, base = damaged
    reader = open_store(f"{base}/cells.zarr")
    (target / "cells.zarr" / "X" / "indices" / "c" / "1").unlink()
    with pytest.raises(CorruptDataError, match="X/indices/c/1: chunk: the chunk file is missing"):
        for unit in range(len(reader.meta.unit_sizes)):
            reader.read_unit(unit)


def test_missing_and_unreachable_stores_are_one_line(served, capsys):
    _, base = served
    with pytest.raises(DataValidationError, match="no store at this URL") as err:
        open_store(f"{base}/nope.zarr")
    assert str(err.value).startswith(f"{base}/nope.zarr: manifest.json: ")
    assert main(["data", "inspect", f"{base}/nope.zarr"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"error: {base}/nope.zarr: ")
    # a port nobody listens on: refused at once, never a hang or a traceback
    port = _closed_port()
    with pytest.raises(DataValidationError, match="unreachable") as err:
        open_store(f"http://127.0.0.1:{port}/cells.zarr")
    assert f"127.0.0.1:{port}/cells.zarr" in str(err.value)
    with pytest.raises(DataValidationError, match="remote extra|cannot open"):
        open_store("nosuchproto://bucket/cells.zarr")


def _closed_port() -> int:
    """A loopback port with no listener."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inspect_and_a_local_cache_read_a_url(served, capsys, tmp_path):
    root, base = served
    assert main(["data", "inspect", f"{base}/cells.wds", "--json"]) == 0
    assert '"n_cells": 1200' in capsys.readouterr().out
    cached = f"simplecache::{base}/cells.zarr"
    reader = open_store(cached)
    _same_blocks(reader.read_unit(3), open_store(root / "cells.zarr").read_unit(3))


def test_s3_through_a_moto_server(small_store, served, monkeypatch):
    """s3:// against moto's S3 server on loopback (endpoint from AWS_ENDPOINT_URL)."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    root, _ = served
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("cells")
        for name in ("cells.zarr", "cells.wds"):
            fs.put(str(root / name), f"cells/{name}", recursive=True)
            local, remote = open_store(root / name), open_store(f"s3://cells/{name}")
            for unit in range(len(local.meta.unit_sizes)):
                _same_blocks(remote.read_unit(unit), local.read_unit(unit))
            assert verify_store(f"s3://cells/{name}") == []
        fs.rm("cells/cells.zarr/X/data/c/0")
        with pytest.raises(CorruptDataError, match="X/data/c/0: chunk: the chunk file is missing"):
            open_store("s3://cells/cells.zarr").read_unit(0)
        with pytest.raises(DataValidationError, match="no store at this URL"):
            open_store("s3://cells/nope.zarr")
    finally:
        server.stop()
