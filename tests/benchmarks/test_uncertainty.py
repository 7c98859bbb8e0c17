"""``latentcell benchmark uncertainty`` end to end on a tiny store (a conditional VAE of a few
steps, two baselines, five members): every entry scored on the same groups, the aggregates
recomputed from the per-group values, the calibrated reference where it should be, and
bad flags as one line before any work."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from latentcell.evaluation.uncertainty import calibrated_coverage
from latentcell.launch.cli import main


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("uncertainty")
    h5ad = root / "cells.h5ad"
    synthesize(SynthConfig(n_cells=1200, n_genes=60, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=3, pert_shift_scale=1.5), h5ad)  # fmt: skip
    store = root / "store.zarr"
    build_store([h5ad], store, schema="vcc", chunk_cells=200)
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.3\n")
    return store, split


def test_uncertainty_scores_every_entry_beside_the_reference(task, tmp_path, capsys):
    store, split = task
    out = tmp_path / "unc"
    argv = ["benchmark", "uncertainty", "--data", str(store), "--split", str(split),
            "--models", "cvae", "--set", "cvae:train.max_steps=30", "--baselines",
            "control,mean", "--members", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entries = {e["entry"]: e for e in results["entries"]}
    assert set(entries) == {"cvae-b", "cvae-a", "control", "mean", "real_resample"}
    # 3 perturbations x 2 cell types, each with enough real cells
    assert results["n_groups"] == 6 and not results["skipped"]
    for entry in entries.values():
        assert len(entry["groups"]) == 6
        for key in ("variance_r2", "coverage_90", "interval_width"):
            values = [g[key] for g in entry["groups"]]
            assert all(math.isfinite(v) for v in values)
            assert entry["table"][key]["mean"] == pytest.approx(np.mean(values))
            assert entry["table"][key]["sd"] == pytest.approx(np.std(values, ddof=1))
        assert all(0.0 <= g["coverage_90"] <= 1.0 for g in entry["groups"])
    reference = entries["real_resample"]["table"]
    expected = calibrated_coverage(5)  # 4/6: five members' interval spans min..max
    assert results["calibrated_coverage"] == pytest.approx(expected)
    assert reference["coverage_90"]["mean"] == pytest.approx(expected, abs=0.12)
    assert reference["variance_r2"]["mean"] > 0.5
    # the control cells miss the perturbation's shift: their interval misses the real mean
    assert reference["coverage_90"]["mean"] > entries["control"]["table"]["coverage_90"]["mean"]
    text = (out / "results.md").read_text()
    assert "| real_resample |" in text and "| cvae-b |" in text and "0.9" in text
    assert "| real_resample |" in capsys.readouterr().out
    assert results["runs"]["cvae"]["run_dir"].endswith("runs/cvae/seed0")


def test_runs_from_reuses_a_finished_run(task, tmp_path):
    store, split = task
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["benchmark", "uncertainty", "--data", str(store), "--split", str(split),
              "--models", "cvae", "--set", "cvae:train.max_steps=5", "--baselines", "none",
              "--members", "3"]  # fmt: skip
    assert main([*common, "--out", str(first)]) == 0
    assert main([*common, "--runs-from", str(first), "--out", str(second)]) == 0
    results = json.loads((second / "results.json").read_text())
    assert results["runs"]["cvae"]["reused"] is True
    assert results["runs"]["cvae"]["run_dir"] == str(first / "runs" / "cvae" / "seed0")
    assert not (second / "runs").exists()
    before = json.loads((first / "results.json").read_text())["entries"]
    # the same run and the same control draws: the same scores
    assert [e["table"] for e in results["entries"]] == [e["table"] for e in before]


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--models", "nonesuch"], "--models"),
        (["--models", "vae"], "--models"),
        (["--baselines", "latent"], "--baselines"),
        (["--members", "1"], "--members"),
        (["--set", "st:train.max_steps=3", "--models", "cvae"], "--set"),
        (["--data", "x.zarr"], "--data/--split"),
        (["--runs-from", "no/such/folder"], "--runs-from"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys, flags, field):
    out = tmp_path / "never"
    code = main(["benchmark", "uncertainty", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0]
    assert not out.exists()
