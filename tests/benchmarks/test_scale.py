"""10M cells x 2,000 genes: synthesized (streamed), built, streamed one epoch on one process,
beside 1M. Streaming memory stays under 2 GB and does not grow with the store. About half an
hour on 2 cores and 12 GB of disk, hence slow; the 1M run by hand:
``latentcell benchmark scale --out DIR --cells 1000000``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_ten_million_cells_stream_in_flat_memory(tmp_path):
    if shutil.disk_usage(tmp_path).free < 20e9:
        pytest.skip("needs 20 GB of free disk")
    done = subprocess.run([sys.executable, "-m", "latentcell.launch", "benchmark", "scale",
                           "--out", str(tmp_path), "--cells", "1000000", "10000000"],
                          capture_output=True, text=True, timeout=3 * 3600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    small, large = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert large["stream"]["cells"] == 10_000_000 and small["stream"]["cells"] == 1_000_000
    assert large["stream"]["peak_rss_mb"] < 2000
    assert large["stream"]["peak_rss_mb"] < 1.3 * small["stream"]["peak_rss_mb"]
