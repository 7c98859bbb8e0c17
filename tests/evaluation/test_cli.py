"""``latentcell evaluate generation`` through the parser that ``add_evaluate_commands`` builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.evaluation.cli import add_evaluate_commands, parse_baselines
from tests.evaluation.synthetic import CONDITIONS, nb_cells

SIZES = dict.fromkeys(CONDITIONS, 165)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentcell")
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
