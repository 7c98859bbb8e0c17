"""``latentcell benchmark heldout-celltype`` end to end on a tiny data set (a few steps per
model): every method and metric per held-out cell type, and the real-vs-real ceiling where
the answer is known (two halves of the same cells agree)."""

from __future__ import annotations

import json

import numpy as np

from latentcell.benchmarks.heldout_celltype import METHODS, METRICS
from latentcell.launch.cli import main


def test_heldout_celltype_runs_and_reports(tmp_path):
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    data = tmp_path / "cells.h5ad"
    synthesize(SynthConfig(n_cells=1500, n_genes=60, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=4, pert_type_scale=0.5), data)  # fmt: skip
    out = tmp_path / "bench"
    argv = ["benchmark", "heldout-celltype", "--data", str(data), "--out", str(out),
            "--st-steps", "4", "--vae-steps", "4", "--cells-per-perturbation", "40",
            "--top-genes", "20"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["cell_types"]) == {"T cell", "B cell"}
    for result in report["cell_types"].values():
        assert set(result["mean"]) == set(METHODS)
        for method in METHODS:
            assert set(result["mean"][method]) == set(METRICS)
        ceiling, identity = result["mean"]["real_half"], result["mean"]["control"]
        assert ceiling["pearson_delta_top"] > 0.8 and ceiling["r2_means_top"] > 0.8
        assert ceiling["energy"] < identity["energy"]
    assert np.isfinite(report["mean"]["st"]["energy"])
    assert "| st |" in (out / "results.md").read_text()


def test_one_cell_type_is_refused_in_one_line(tmp_path, capsys):
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    data = tmp_path / "one.h5ad"
    synthesize(SynthConfig(n_cells=300, n_genes=30, n_perturbations=2, n_cell_types=1), data)
    code = main(
        ["benchmark", "heldout-celltype", "--data", str(data), "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "cell type" in err[-1]
