"""The GPU check's CPU fallback, CI-sized, so the script a GPU loan runs cannot rot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from latentcell.benchmarks.gpu_check import (
    _overrides,
    cells_per_step,
    compute_only,
    flops_per_cell,
)
from latentcell.families import family_named
from latentcell.families.train import load_family_config

REPO = Path(__file__).resolve().parents[2]


def test_the_script_trains_each_family_and_reports_throughput(small_store, tmp_path):
    env = {**os.environ, "STEPS": "2", "TINY": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(tmp_path / "gc")],
                          env={**env, "STORE": str(small_store)}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gc" / "results.json").read_text())
    assert [r["family"] for r in report["rows"]] == ["vae", "dit", "st"]
    for row in report["rows"]:
        assert row["steps"] == 2 and row["cells_per_s"] > 0 and row["parameters"] > 1000
        assert row["achieved_tflops"] > 0
        assert (row["mfu"] is None) == (report["device"] == "cpu")
    assert "| vae |" in (tmp_path / "gc" / "results.md").read_text()
    assert report["store"] == str(small_store)
    # the compute-only timing a GPU adds (steps on one resident batch), run here on the CPU
    args = argparse.Namespace(store=str(small_store), out=str(tmp_path / "gc"), steps=2,
                              no_tracking=True)  # fmt: skip
    for name in ("vae", "dit", "st"):
        family = family_named(name)
        overrides = _overrides(name, args, tmp_path / "gc" / "vae", tiny=True)
        overrides = [o.replace("/gc/", "/compute/") if o.startswith("run.dir") else o
                     for o in overrides]  # fmt: skip
        config = load_family_config(family, None, overrides)
        timing = compute_only(family, config, steps=2, device="cpu")
        assert timing["cells_per_step"] == cells_per_step(name, config) > 0
        assert timing["compute_only_cells_per_s"] > 0 and timing["compute_only_step_ms"] > 0


class _Config:
    def __init__(self, **model):
        self.model = type("M", (), model)
        self.data = type("D", (), {"set_size": 64})


def test_flops_per_cell_follows_the_convention():
    assert flops_per_cell("vae", _Config(), 1000, 10) == 6000
    # DiT: 10 latent dims in patches of 4 -> 3 tokens
    dit = _Config(patch_size=4, depth=2, hidden=8)
    assert flops_per_cell("dit", dit, 1000, 10) == 6000 * 3 + 12 * 2 * 8 * 9
    st = _Config(depth=2, hidden=8)
    assert flops_per_cell("st", st, 1000, 10) == 6000 + 12 * 2 * 8 * 64
