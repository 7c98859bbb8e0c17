"""The loader benchmark on a tiny store: every loader delivers, one entry each, the ratios and
targets computed from what ran, and a bad loader name is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from latentcell.benchmarks import loader

pytest.importorskip("scdataset")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentcell.launch", "benchmark", "loader", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_every_loader_delivers_and_the_report_keeps_one_entry_each(tmp_path):
    names = ["zarr_stream", "webdataset_stream", "set_sampler", "scdataset_b16_f16",
             "anndata_backed", "gather_to_torch", "gather_ceiling"]  # fmt: skip
    done = _cli("--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "data"),
                "--cells", "3000", "--genes", "120", "--perturbations", "4", "--batch-size", "64",
                "--rounds", "2", "--seconds", "0.2", "--loaders", ",".join(names))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in names:
        entry = report["loaders"][name]
        assert "error" not in entry, entry
        assert len(entry["windows"]) == 2 and entry["cells_per_s"] > 0 and entry["peak_rss_mb"] > 0
    assert "not_measured" in report["loaders"]["annbatch"]
    ratios = report["ratios"]
    rate = {k: v["cells_per_s"] for k, v in report["loaders"].items() if "cells_per_s" in v}
    assert ratios["zarr_stream / gather_ceiling"] == pytest.approx(
        rate["zarr_stream"] / rate["gather_ceiling"]
    )
    assert ratios["best scdataset setting"] == "scdataset_b16_f16"
    assert set(report["targets"]) == set(loader.TARGETS)
    assert "| zarr_stream |" in (tmp_path / "out" / "results.md").read_text()


def test_unknown_loader_is_one_line(tmp_path):
    done = _cli("--out", str(tmp_path), "--loaders", "zarr_stream,fastest_loader")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "fastest_loader" in done.stderr


@pytest.mark.parametrize("form", ["csr", "dense"])
def test_every_loader_hands_over_the_same_tensor(form):
    X = sp.random(30, 12, density=0.3, format="csr", dtype=np.float32, random_state=0)
    out = loader.deliver(X, form)
    assert out.dtype == torch.float32 and out.shape == (30, 12)
    assert out.layout == (torch.sparse_csr if form == "csr" else torch.strided)
    np.testing.assert_array_equal(out.to_dense().numpy(), X.toarray())


def test_targets_are_judged_on_what_was_measured():
    results = {
        "zarr_stream": {"cells_per_s": 600},
        "webdataset_stream": {"cells_per_s": 420},
        "scdataset_b1_f16": {"cells_per_s": 50},
        "scdataset_b16_f16": {"cells_per_s": 120},
        "gather_ceiling": {"cells_per_s": 1500},
        "anndata_backed": {"error": "boom"},
    }
    found = loader.ratios(results)
    assert found["zarr_stream / best scdataset"] == 5.0
    assert found["webdataset_stream / zarr_stream"] == 0.7
    assert "zarr_stream / anndata_backed" not in found
    targets = loader.check_targets(found)
    assert not targets["zarr_stream / best scdataset"]["met"]
    assert targets["zarr_stream / gather_ceiling"]["met"]  # 0.4 >= 0.35
    assert "set_sampler cells/s" not in targets
