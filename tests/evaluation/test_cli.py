"""``latentcell evaluate generation`` through the parser that ``add_evaluate_commands`` builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.lazy_commands import CommandParser
from latentcell.evaluation.cli import add_evaluate_commands, parse_baselines
from tests.evaluation.synthetic import CONDITIONS, nb_cells

SIZES = dict.fromkeys(CONDITIONS, 165)
SWAP = {"ctrl": "pertA", "pertA": "pertB", "pertB": "ctrl"}


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="latentcell")
    add_evaluate_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = {name: root / f"{name}.h5ad" for name in ("real", "generated", "prior", "short")}
    nb_cells(SIZES, seed=1).write_h5ad(paths["real"])
    nb_cells(SIZES, seed=2).write_h5ad(paths["generated"])
    nb_cells(SIZES, seed=3).write_h5ad(paths["prior"])
    nb_cells(SIZES, seed=2)[:, :250].copy().write_h5ad(paths["short"])
    return paths


def _args(files, out, *extra: str) -> argparse.Namespace:
    argv = ["evaluate", "generation", "--real", str(files["real"]), "--condition-col"]
    argv += ["condition", "--out", str(out), "--n-pcs", "20", *extra]
    return _parser().parse_args(argv)


def test_cli_writes_summary_and_prints_the_table(files, tmp_path, capsys):
    out = tmp_path / "eval"
    args = _args(
        files,
        out,
        "--generated",
        str(files["generated"]),
        "--baseline",
        f"vae_prior={files['prior']}",
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for name in ("generated", "vae_prior", "gaussian_pca", "real_ceiling", "energy", "kNN_AUC"):
        assert name in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["n_pcs"] == 20
    assert list(summary["methods"]) == ["generated", "vae_prior", "gaussian_pca", "real_ceiling"]
    assert (out / "pca_real_vs_generated.png").exists()
    assert (out / "metrics_vs_baselines.png").exists()


def test_cli_gene_mismatch_names_the_file(files, tmp_path):
    args = _args(files, tmp_path / "eval", "--generated", str(files["short"]))
    with pytest.raises(DataValidationError, match="50 of the 300 real genes are missing") as err:
        args.func(args)
    assert err.value.path == str(files["short"])
    assert not (tmp_path / "eval").exists()


def test_cli_missing_file_and_bad_baseline_spec(files, tmp_path):
    args = _args(files, tmp_path / "eval", "--generated", str(tmp_path / "absent.h5ad"))
    with pytest.raises(DataValidationError, match="file not found"):
        args.func(args)
    with pytest.raises(DataValidationError, match="NAME=FILE"):
        parse_baselines(["no_equals_sign"])
    assert parse_baselines(["a=x.h5ad", "b=y.h5ad"]) == {"a": Path("x.h5ad"), "b": Path("y.h5ad")}


@pytest.fixture(scope="module")
def more_files(tmp_path_factory):
    """Real cells with a rare condition and a cell_type column; generated cells of two seeds
    (the second with swapped labels), without a cell_type column."""
    root = tmp_path_factory.mktemp("cli_more")
    real = nb_cells({**SIZES, "rare": 22}, seed=1)
    real.obs["cell_type"] = real.obs["condition"].map(lambda c: "T" if c == "ctrl" else "B")
    seeds = [nb_cells(SIZES, seed=2), nb_cells(SIZES, seed=3, relabel=SWAP)]
    for seed, part in enumerate(seeds):
        part.obs["sampling_seed"] = seed
        part.obs_names = [f"s{seed}-{n}" for n in part.obs_names]
    paths = {"real": root / "real.h5ad", "seeds": root / "seeds.h5ad"}
    real.write_h5ad(paths["real"])
    ad.concat(seeds).write_h5ad(paths["seeds"])
    return paths


def _more_args(files, out, *extra: str) -> argparse.Namespace:
    argv = ["evaluate", "generation", "--real", str(files["real"]), "--generated"]
    argv += [str(files["seeds"]), "--condition-col", "condition", "--out", str(out)]
    return _parser().parse_args([*argv, "--n-pcs", "10", *extra])


def test_cli_prints_skipped_conditions_and_the_spread_over_seeds(more_files, tmp_path, capsys):
    args = _more_args(more_files, tmp_path / "eval")
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 conditions evaluated, 1 skipped; min_cells 12 (auto)")
    assert lines[1] == (
        "skipped: rare: 7 cells, fewer than 12 reference cells, the least the kNN AUC needs "
        "(2 * knn_k + 2)"
    )
    assert lines[2].startswith("generated: 2 sampling seeds (0, 1), scored separately")
    generated_row = next(line for line in lines if line.startswith("generated "))
    ceiling_row = next(line for line in lines if line.startswith("real_ceiling "))
    assert generated_row.count("±") == 13 and "±" not in ceiling_row
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["seeds"]["methods"]["generated"]["seeds"] == [0, 1]
    assert summary["classifier"]["column"] == "condition"  # the default


def test_cli_explicit_min_cells_and_bad_values(more_files, tmp_path, capsys):
    args = _more_args(more_files, tmp_path / "eval", "--min-cells", "40")
    assert args.func(args) == 0
    assert "min_cells 40 (given)" in capsys.readouterr().out
    for bad, match in (("lots", "expected 'auto' or an integer"), ("3", "at least 2 \\* knn_k")):
        args = _more_args(more_files, tmp_path / "bad", "--min-cells", bad)
        with pytest.raises(DataValidationError, match=match):
            args.func(args)
    assert not (tmp_path / "bad").exists()


def test_cli_classifier_column_missing_names_the_file(more_files, tmp_path, capsys):
    args = _more_args(more_files, tmp_path / "eval", "--classifier-col", "cell_type")
    with pytest.raises(DataValidationError, match="--classifier-col") as err:
        args.func(args)
    assert err.value.path == str(more_files["seeds"]) and err.value.field == "obs['cell_type']"
    assert not (tmp_path / "eval").exists()


def _finished_run(root: Path) -> tuple[Path, str, str]:
    """A training run as the trainer leaves it: a FINISHED MLflow run in a SQLite store and
    ``summary.json`` naming it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("latentcell", artifact_location=str(root / "art"))
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    run_dir = root / "run"
    run_dir.mkdir()
    summary = {"mlflow": {"run_id": run_id, "tracking_uri": uri}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir, uri, run_id


def test_run_gets_the_evaluation_without_changing_its_times(files, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    run_dir, uri, run_id = _finished_run(tmp_path)
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    out = tmp_path / "eval"
    args = _args(files, out, "--generated", str(files["generated"]), "--run", str(run_dir))
    assert args.func(args) == 0
    assert f"runs:/{run_id}/evaluation/generation" in capsys.readouterr().out
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.end_time)
    energy = json.loads((out / "summary.json").read_text())["methods"]["generated"]["macro"]
    assert float(after.data.tags["eval/generation/energy_distance"]) == pytest.approx(
        energy["energy_distance"], rel=1e-5
    )
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation/generation")}
    assert "evaluation/generation/pca_real_vs_generated.png" in logged


def test_a_run_without_mlflow_fails_before_evaluating(files, tmp_path):
    run_dir = tmp_path / "untracked"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"mlflow": {"run_id": None}}))
    out = tmp_path / "eval"
    args = _args(files, out, "--generated", str(files["generated"]), "--run", str(run_dir))
    with pytest.raises(DataValidationError, match="not tracked in MLflow"):
        args.func(args)
    assert not out.exists()
