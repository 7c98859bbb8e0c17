"""``latentcell benchmark perturbation`` end to end on a tiny store (a few steps per family):
every entry evaluated the same way over two seeds, mean ± sd recomputed independently, the
references in the table, one MLflow parent run with a child run per entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latentcell.launch.cli import main

FAMILIES = "st,cvae,latent-shift,latent-delta"
TINY = [
    "st:train.max_steps=4", "st:data.set_size=16", "cvae:train.max_steps=4",
    "latent-shift:train.max_steps=4", "vae:train.max_steps=4", "latent-delta:train.max_steps=4",
    "latent-delta:model.hidden=16", "latent-delta:model.depth=1", "latent-delta:model.heads=1",
    "latent-delta:model.sample_steps=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("leaderboard")
    h5ad = root / "cells.h5ad"
    synthesize(SynthConfig(n_cells=1200, n_genes=60, n_perturbations=3, n_cell_types=2,
                           n_batches=2, seed=3), h5ad)  # fmt: skip
    store = root / "store.zarr"
    build_store([h5ad], store, schema="vcc", chunk_cells=200)
    split = root / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.3\n")
    return store, split


def test_leaderboard_trains_predicts_and_tabulates(task, tmp_path):
    store, split = task
    out = tmp_path / "board"
    overrides = [x for o in TINY for x in ("--set", o)]
    argv = ["benchmark", "perturbation", "--data", str(store), "--split", str(split),
            "--models", FAMILIES, "--baselines", "mean,control", "--seeds", "2",
            "--cells-per-perturbation", "30", "--out", str(out), *overrides]  # fmt: skip
    assert main(argv) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["entry"]: r for r in board["rows"]}
    assert {"st", "cvae-b", "cvae-a", "latent-shift", "mean", "control"} <= set(rows)
    # a family's variants are trained and ranked beside it, each mode its own row
    assert {f"latent-delta{v}-{m}" for v in ("", "-absolute")
            for m in ("sampled", "deterministic")} <= set(rows)  # fmt: skip
    absolute = json.loads((out / "runs" / "latent-delta-absolute" / "seed0" / "final"
                           / "model_config.json").read_text())  # fmt: skip
    assert absolute["config"]["target"] == "absolute"
    assert absolute["vae"]["vae_run"] == str(out / "runs" / "vae_for_latent_baseline")
    assert "cell-mean (cell-eval)" in rows and "real vs real (ceiling)" in rows
    for name in ("st", "cvae-b", "latent-shift", "mean"):
        row = rows[name]
        assert len(row["per_seed"]) == 2
        for key, stats in row["table"].items():
            values = [s[key] for s in row["per_seed"] if s.get(key) is not None]
            assert stats["n"] == len(values)
            assert stats["mean"] == pytest.approx(np.mean(values))
            if len(values) == 2:
                assert stats["sd"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))
        assert row["table"]["vcc_score"]["mean"] >= 0.0  # clipped at 0, as the VCC scored
    ceiling = rows["real vs real (ceiling)"]["table"]
    assert ceiling["pds"]["mean"] > rows["control"]["table"]["pds"]["mean"]
    # each family trained once per seed, with that seed
    for family in [*FAMILIES.split(","), "latent-delta-absolute"]:
        assert set(board["runs"][family]) == {"0", "1"}
    text = (out / "leaderboard.md").read_text()
    assert "| st |" in text and "± " in text
    assert (out / "figures" / "leaderboard.png").stat().st_size > 0
    _check_mlflow(out, board, rows)


def _check_mlflow(out, board, rows):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(board["mlflow_parent_run_id"])
    assert parent.data.tags["latentcell.benchmark"] == "perturbation"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_entry = {c.data.tags["latentcell.entry"]: c for c in children}
    assert set(by_entry) == set(rows)
    st = by_entry["st"].data.metrics
    assert st["vcc_score/mean"] == pytest.approx(rows["st"]["table"]["vcc_score"]["mean"])


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--models", "vae"], "--models"),
        (["--baselines", "median"], "--baselines"),
        (["--seeds", "0"], "--seeds"),
        (["--set", "dit:train.max_steps=3"], "--set"),
        (["--data", "x.zarr"], "--data/--split"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys, flags, field):
    out = tmp_path / "never"
    code = main(["benchmark", "perturbation", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0]
    assert not out.exists()


def test_a_bad_split_file_is_one_line_and_writes_nothing(task, tmp_path, capsys):
    store, _ = task
    split = tmp_path / "bad.toml"
    split.write_text("garbage [[\n")
    out = tmp_path / "never"
    code = main(["benchmark", "perturbation", "--data", str(store), "--split", str(split),
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(split) in err[0]
    assert not out.exists()
