"""Every failure a user can cause is one ``error:`` line and exit 2, through the real CLI.

The cases are the kinds of bad input found by trying the project as a careless colleague
would (bad files behind good names, damaged stores, hostile manifests, impossible configs),
plus cases of our own. Each runs ``latentcell.launch.cli.main`` in-process and checks the
exit code, that stderr is exactly one line starting with ``error:``, that it names the
culprit, and that no traceback is printed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from latentcell.data_pipelines.errors import DataValidationError, one_line
from latentcell.launch.cli import main


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr without DeepSpeed's log lines and our own warnings (stdout is
    left in capsys)."""
    try:
        code = main([str(a) for a in argv])
    finally:
        _reset_accelerate()
    captured = capsys.readouterr()
    print(captured.out, end="")  # back into capsys for the test to read
    lines = [line for line in captured.err.splitlines() if not line.startswith(("[20", "warning:"))]
    return code, "\n".join(lines)


def assert_one_line(code: int, err: str, *named: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "Traceback" not in err
    for text in named:
        assert str(text) in err, (text, err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny synthetic h5ad, a store built from it, and bad inputs derived from it."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("error_lines")
    good = root / "cells.h5ad"
    synthesize(SynthConfig(n_cells=300, n_genes=40, n_perturbations=2, seed=0), good)
    adata = ad.read_h5ad(good)
    adata.obs.to_csv(root / "table.h5ad")  # a CSV renamed .h5ad
    (root / "empty.h5ad").write_bytes(b"")
    (root / "truncated.h5ad").write_bytes(good.read_bytes()[:4096])
    controls = np.flatnonzero(adata.obs["target_gene"].astype(str) == "non-targeting")
    adata[controls[:1]].copy().write_h5ad(root / "one.h5ad")
    clash = adata.copy()
    clash.obs["cell_type2"] = clash.obs["cell_type"].astype(str) + "_x"
    clash.write_h5ad(root / "clash.h5ad")
    for name, edit in BAD_CSR.items():
        shutil.copy(good, root / f"{name}.h5ad")
        with h5py.File(root / f"{name}.h5ad", "r+") as f:
            edit(f["X"])
    store = Path(build_store([good], root / "cells.zarr", schema="vcc", chunk_cells=50))
    one = Path(build_store([root / "one.h5ad"], root / "one.zarr", schema="vcc"))
    return {"root": root, "good": good, "store": store, "one": one}


def _set(dataset, index, value):
    data = dataset[:]
    data[index] = value
    dataset[...] = data


BAD_CSR = {
    "index_too_big": lambda x: _set(x["indices"], 5, 10_000),
    "index_negative": lambda x: _set(x["indices"], 7, -3),
    "indptr_decreasing": lambda x: _set(x["indptr"], 10, 0),
    "indptr_short_end": lambda x: _set(x["indptr"], -1, x["indptr"][-1] - 5),
    "indptr_nonzero_start": lambda x: _set(x["indptr"], 0, 2),
}


@pytest.mark.parametrize("name", sorted(BAD_CSR))
def test_build_refuses_malformed_csr(files, tmp_path, capsys, name):
    code, err = run(capsys, "data", "build", files["root"] / f"{name}.h5ad", "--out",
                    tmp_path / "s", "--schema", "vcc")  # fmt: skip
    assert_one_line(code, err, f"{name}.h5ad", "X/ind")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("name", ["table", "empty", "truncated"])
def test_build_refuses_files_that_are_not_h5ad(files, tmp_path, capsys, name):
    code, err = run(capsys, "data", "build", files["root"] / f"{name}.h5ad", "--out",
                    tmp_path / "s")  # fmt: skip
    assert_one_line(code, err, f"{name}.h5ad")


def test_build_refuses_a_role_name_clash(files, tmp_path, capsys):
    code, err = run(capsys, "data", "build", files["root"] / "clash.h5ad", "--out", tmp_path / "s",
                    "--schema", "vcc", "--cell-type-col", "cell_type2")  # fmt: skip
    assert_one_line(code, err, "clash.h5ad", "obs/cell_type", "--cell-type-col")


@pytest.mark.parametrize(
    "argv",
    [["--hvg", "0"], ["--combine-targets"], ["--chunk-cells", "0"], ["--block-cells", "8"]],
    ids=lambda a: a[0],
)
def test_build_option_errors(files, tmp_path, capsys, argv):
    code, err = run(capsys, "data", "build", files["good"], "--out", tmp_path / "s", *argv)
    assert_one_line(code, err, argv[0])


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_edited_manifest(files, tmp_path, capsys, command):
    store = Path(shutil.copytree(files["store"], tmp_path / "s"))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["n_cells"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, err = run(capsys, "data", command, store)
    if command == "inspect":
        assert_one_line(code, err, "manifest.json", "manifest_sha256")
    else:
        out = capsys.readouterr().out
        assert code == 1 and "manifest_sha256" in (out + err)


TRAIN = ["--set", "train.max_steps=2", "--set", "tracking.enabled=false",
         "--set", "train.progress=false"]  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.weight_decay=-inf", "optim.weight_decay"),
        ("train.ema_decay=nan", "train.ema_decay"),
        ("data.on_corrupt=maybe", "on_corrupt"),
        ("train.max_steps=0", "max_steps"),
        ("nope.key=1", "nope"),
    ],
)
def test_train_config_errors(files, tmp_path, capsys, setting, named):
    code, err = run(capsys, "train", "vae", "--set", f"data.path={files['store']}",
                    "--set", f"run.dir={tmp_path / 'r'}", *TRAIN, "--set", setting)  # fmt: skip
    assert_one_line(code, err, named)


@pytest.mark.parametrize("stage", ["vae", "st", "st-pretrain"])
def test_train_on_a_one_cell_store(files, tmp_path, capsys, stage):
    code, err = run(capsys, "train", stage, "--set", f"data.path={files['one']}",
                    "--set", f"run.dir={tmp_path / 'r'}", *TRAIN)  # fmt: skip
    assert_one_line(code, err, "one.zarr")


def test_train_on_a_missing_or_wrong_store(files, tmp_path, capsys):
    for path, named in ((tmp_path / "nothing", "nothing"), (files["good"], "cells.h5ad")):
        code, err = run(capsys, "train", "vae", "--set", f"data.path={path}",
                        "--set", f"run.dir={tmp_path / 'r'}", *TRAIN)  # fmt: skip
        assert_one_line(code, err, named)


def test_train_on_a_damaged_store_names_the_chunk(files, tmp_path, capsys):
    store = Path(shutil.copytree(files["store"], tmp_path / "s"))
    chunk = sorted((store / "X" / "data" / "c").iterdir())[1]
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    code, err = run(capsys, "train", "vae", "--set", f"data.path={store}",
                    "--set", f"run.dir={tmp_path / 'r'}", "--set", "data.val_fraction=0",
                    *TRAIN)  # fmt: skip
    assert_one_line(code, err, str(chunk), "on_corrupt")


def test_train_vae_on_a_latent_store(files, tmp_path, capsys):
    from latentcell.data_pipelines.latent_store import write_latent_store
    from latentcell.data_pipelines.stores import open_store

    reader = open_store(files["store"])
    latents = write_latent_store(
        reader, lambda b: np.zeros((b.n_cells, 3), np.float32), tmp_path / "lat", 3
    )
    code, err = run(capsys, "train", "vae", "--set", f"data.path={latents}",
                    "--set", f"run.dir={tmp_path / 'r'}", *TRAIN)  # fmt: skip
    assert_one_line(code, err, "lat", "latent")


@pytest.mark.parametrize("name", ["table", "empty", "truncated"])
def test_predict_refuses_bad_controls(files, tmp_path, capsys, name):
    code, err = run(capsys, "predict", "--baseline", "mean", "--train", files["good"],
                    "--controls", files["root"] / f"{name}.h5ad", "--perturbations", "all",
                    "--cells-per-perturbation", "5", "--out", tmp_path / "p.h5ad")  # fmt: skip
    assert_one_line(code, err, f"{name}.h5ad", "--controls")
    assert not (tmp_path / "p.h5ad").exists()


def test_evaluate_refuses_bad_files(files, tmp_path, capsys):
    code, err = run(capsys, "evaluate", "generation", "--real", files["root"] / "table.h5ad",
                    "--generated", files["good"], "--condition-col", "cell_type",
                    "--out", tmp_path / "e")  # fmt: skip
    assert_one_line(code, err, "table.h5ad")


@pytest.fixture(scope="module")
def vae_run(files):
    run_dir = files["root"] / "vae_run"
    argv = ["train", "vae", "--set", f"data.path={files['store']}", "--set", f"run.dir={run_dir}",
            "--set", "model.n_latent=4", "--set", "model.n_hidden=16", *TRAIN]  # fmt: skip
    assert main(argv) == 0
    _reset_accelerate()
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_safetensors", "wrong_shapes"])
def test_export_refuses_damaged_weights(vae_run, tmp_path, capsys, damage):
    run_dir = Path(shutil.copytree(vae_run, tmp_path / "run"))
    weights = run_dir / "final" / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "wrong_shapes":
        from safetensors.numpy import save_file

        save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(weights))
    else:
        weights.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"",
                             "not_safetensors": b"\x80\x04K\x01."}[damage])  # fmt: skip
    code, err = run(capsys, "export", "--run", run_dir, "--out", tmp_path / "b", "--no-mlflow")
    assert_one_line(code, err, "model.safetensors")
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_damaged_model_card(vae_run, tmp_path, capsys):
    run_dir = Path(shutil.copytree(vae_run, tmp_path / "run"))
    for text in ("{not json", "[1, 2]", '{"class": "latentcell.models.count_vae.CountVAE"}'):
        (run_dir / "final" / "model_config.json").write_text(text)
        code, err = run(capsys, "export", "--run", run_dir, "--out", tmp_path / "b", "--no-mlflow")
        assert_one_line(code, err, "model_config.json")


def test_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch):
    argv = ["data", "build", str(files["root"] / "table.h5ad"), "--out", str(tmp_path / "s")]
    assert main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("LATENTCELL_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_edge_rule():
    """Known user errors exit 2, OS errors name their file, anything else is one line, exit 1."""
    line, code = one_line(DataValidationError("f.h5ad", "X", "bad", "fix it"))
    assert (line, code) == ("error: f.h5ad: X: bad. Fix: fix it", 2)
    line, code = one_line(FileNotFoundError(2, "No such file or directory", "/nope"))
    assert code == 2 and line.startswith("error: /nope: No such file")
    line, code = one_line(PermissionError(13, "Permission denied", "/root/x"))
    assert code == 2 and "/root/x" in line and "permissions" in line
    line, code = one_line(KeyError("x\ny"))
    assert code == 1 and "\n" not in line and "--debug" in line


def test_train_skips_a_damaged_unit_when_asked_and_records_it(files, tmp_path, capsys):
    """``data.on_corrupt=skip``: the run finishes, prints the damaged file once and lists it
    in summary.json; the default stops (test above)."""
    store = Path(shutil.copytree(files["store"], tmp_path / "s"))
    chunk = sorted((store / "X" / "indices" / "c").iterdir())[1]
    raw = bytearray(chunk.read_bytes())
    raw[-9] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    run_dir = tmp_path / "r"
    code = main(["train", "vae", "--set", f"data.path={store}", "--set", f"run.dir={run_dir}",
                 "--set", "data.val_fraction=0", "--set", "data.on_corrupt=skip",
                 "--set", "data.batch_size=64", *TRAIN])  # fmt: skip
    _reset_accelerate()
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(f"warning: skipping damaged data {chunk}") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["n_skipped_units"] == 1
    assert summary["data"]["skipped_units"][0]["file"] == str(chunk)


def test_a_reader_that_goes_away_is_not_an_error():
    """``latentcell data inspect STORE | head -1``: the closed pipe ends the command quietly
    with exit 0, as Unix tools do, not with an ``internal error`` line."""
    import subprocess
    import sys

    script = ("import sys\nfrom latentcell.data_pipelines.errors import run_cli\n"
              "def command():\n    for i in range(200000):\n        print('line', i)\n"
              "sys.exit(run_cli(command, False))\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b""
