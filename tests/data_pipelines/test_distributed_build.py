"""A distributed build on a real Dask cluster (2 worker processes on loopback, no mocks):
the same cells as the in-process build, nothing published when a worker dies, and a re-run
that redoes only the missing or changed parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import open_store, verify_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize

distributed = pytest.importorskip("distributed")
OPTS = {"schema": "scbasecount", "read_cells": 300}
WDS = {"format": "webdataset", "block_cells": 64, "cells_per_shard": 256}


@pytest.fixture(scope="module")
def cluster():
    import dask

    # a part whose worker died fails at once (the default retries it three times); one task
    # per worker at a time, as ``--scheduler processes`` sets, so no other part dies with it
    config = {"distributed.scheduler.allowed-failures": 0,
              "distributed.scheduler.worker-saturation": 1.0}  # fmt: skip
    with (
        dask.config.set(config),
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 host="127.0.0.1", dashboard_address=None) as c,
    ):  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four scBaseCount-style samples, each with its own gene subset."""
    folder = tmp_path_factory.mktemp("syn") / "samples"
    config = SynthConfig(schema="scbasecount", split_samples=True, n_cells=2400, n_genes=150,
                         n_batches=4, n_cell_types=3, seed=3)  # fmt: skip
    synthesize(config, folder)
    return sorted(str(p) for p in folder.glob("*.h5ad"))


def everything(path: str):
    reader = open_store(path, names=True)
    return reader, reader.read_rows(0, reader.meta.n_cells)


def assert_same_store(a: str, b: str) -> None:
    ra, ba = everything(a)
    rb, bb = everything(b)
    assert ra.meta.var.equals(rb.meta.var) and ra.meta.categories == rb.meta.categories
    assert (ba.X != bb.X).nnz == 0
    np.testing.assert_array_equal(ba.names, bb.names)
    np.testing.assert_array_equal(ba.library_size, bb.library_size)
    for col in ba.codes:
        np.testing.assert_array_equal(ba.codes[col], bb.codes[col])
    for col in ba.numeric:
        np.testing.assert_array_equal(ba.numeric[col], bb.numeric[col])
    assert ra.group_index().equals(rb.group_index())
    assert ra.meta.manifest["category_counts"] == rb.meta.manifest["category_counts"]
    assert verify_store(b) == []


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_same_cells_as_the_in_process_build(cluster, inputs, tmp_path, fmt):
    extra = WDS if fmt == "webdataset" else {"chunk_cells": 200}
    local = build_store(inputs, tmp_path / "local", scheduler="none", **OPTS, **extra)
    dist = build_store(inputs, tmp_path / "dist", scheduler=cluster.scheduler_address,
                       **OPTS, **extra)  # fmt: skip
    assert_same_store(local, dist)
    manifest = open_store(dist).meta.manifest
    assert manifest["build"]["distributed"]["parts_written"] == 4
    assert not (tmp_path / "dist.parts").exists()
    if fmt == "zarr":  # the same chunks, byte for byte
        assert manifest["checksums"] == open_store(local).meta.manifest["checksums"]


def _dies_on_third_input(task, shared):
    """A part function whose worker process dies on input 2 (as if killed mid-part), once the
    other parts are done or after 20 s (a part queued behind it on the same worker dies with
    it, which the assertions below allow)."""
    import time
    from pathlib import Path

    from latentcell.data_pipelines.build_parts import write_part

    if task.index == 2:
        staging = Path(task.part_dir).parent
        deadline = time.monotonic() + 20
        while len(list(staging.glob("part-??????/manifest.json"))) < 3:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        os._exit(13)
    return write_part(task, shared)


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_dead_worker_publishes_nothing_and_rerun_redoes_only_that_part(
    cluster, inputs, tmp_path, fmt
):
    extra = WDS if fmt == "webdataset" else {}
    out = tmp_path / "store"
    with pytest.raises(DataValidationError, match="worker writing this input's part died") as e:
        build_store(inputs, out, scheduler=cluster.scheduler_address,
                    part_fn=_dies_on_third_input, **OPTS, **extra)  # fmt: skip
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("store.tmp-*"))
    finished = {p.parent.name for p in (tmp_path / "store.parts").glob("part-??????/manifest.json")}
    assert "part-000002" not in finished
    assert finished == {"part-000000", "part-000001", "part-000003"}  # the usual case

    mtime = os.stat(inputs[1]).st_mtime_ns + 10**9  # input 1 "changed": its part is redone too
    os.utime(inputs[1], ns=(mtime, mtime))
    build_store(inputs, out, scheduler=cluster.scheduler_address, **OPTS, **extra)
    counts = open_store(out).meta.manifest["build"]["distributed"]
    assert (counts["parts_written"], counts["parts_reused"]) == (2, 2)
    assert_same_store(build_store(inputs, tmp_path / "local", scheduler="none", **OPTS, **extra),
                      str(out))  # fmt: skip


def test_bad_value_on_a_worker_is_one_line_and_nothing_is_published(cluster, inputs, tmp_path):
    bad = [str(tmp_path / os.path.basename(p)) for p in inputs]
    for src, dst in zip(inputs, bad, strict=True):
        shutil.copyfile(src, dst)
    with h5py.File(bad[3], "r+") as f:  # found only when the worker reads the cells
        f["X/data"][0] = 0.5
    with pytest.raises(DataValidationError, match="non-integer") as e:
        build_store(bad, tmp_path / "store", scheduler=cluster.scheduler_address, **OPTS)
    assert e.value.path == bad[3] and not (tmp_path / "store").exists()


def test_cli_local_processes(inputs, tmp_path, capsys):
    from latentcell.launch.cli import main

    listing = tmp_path / "inputs.txt"  # 61k paths do not fit on a command line: @FILE
    listing.write_text("".join(f"{path}\n" for path in inputs))
    argv = ["data", "build", f"@{listing}", "--out", str(tmp_path / "s"), "--schema",
            "scbasecount", "--scheduler", "processes", "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "parts: 4 written, 0 reused, on 2 Dask workers" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["build"]["distributed"]["workers"] == 2
    assert len(manifest["inputs"]) == len(inputs)
    assert main([*argv[:-4], "--scheduler", "nowhere"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert main([*argv[:-4], "--out", str(tmp_path / "t"), "--scheduler", "none",
                 "--workers", "3"]) == 2  # fmt: skip


def test_help_does_not_import_dask():
    code = ("import sys\nfrom latentcell.launch.cli import main\ntry:\n"
            "    main(['data', 'build', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--scheduler" in done.stdout
