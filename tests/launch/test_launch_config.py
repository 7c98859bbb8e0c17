"""Launch configs work from any directory: ``latentcell launch-config NAME`` prints a config
whose DeepSpeed JSON path is absolute, the trainer finds the repository's relative
``launch/deepspeed/*.json`` in the package, and a real 2-process ZeRO-2 run started from a
temporary directory trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.launch.cli import main
from latentcell.launch.launch_config import NAMES, launch_config
from latentcell.trainer.deepspeed_config import LAUNCH_DATA, resolve_deepspeed_config
from tests.trainer.launching import REPO, accelerate_exe, run


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository, and a private cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("name", NAMES)
def test_every_printed_config_loads_and_names_an_absolute_deepspeed_json(elsewhere, name, capsys):
    from accelerate.commands.config import load_config_from_file

    assert main(["launch-config", name]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_absolute() and path.is_file()
    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads
    ds = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if name.startswith("zero"):
        assert path.parent == elsewhere / "cache" / "latentcell" / "launch"
        ds = Path(ds)
        assert ds.is_absolute() and ds.is_file() and ds.name == f"{name}.json"
        assert json.loads(ds.read_text())["zero_optimization"]["stage"] == int(name[-1])
    else:
        assert ds is None and path == LAUNCH_DATA / "accelerate" / f"{name}.yaml"


def test_rewriting_is_idempotent(elsewhere):
    first = launch_config("zero3")
    stamp = first.stat().st_mtime_ns
    assert launch_config("zero3") == first and first.stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_unknown_name_is_one_line_listing_the_names(elsewhere, capsys):
    assert main(["launch-config", "zero4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "zero4" in err
    assert err.endswith("Fix: use one of " + ", ".join(NAMES))


def test_the_repository_relative_json_resolves_from_anywhere(elsewhere):
    shipped = REPO / "launch" / "deepspeed" / "zero2.json"
    assert resolve_deepspeed_config("launch/deepspeed/zero2.json") == shipped
    own = elsewhere / "launch" / "deepspeed" / "zero2.json"  # a file of the user's own wins
    own.parent.mkdir(parents=True)
    own.write_text("{}")
    assert resolve_deepspeed_config("launch/deepspeed/zero2.json") == own
    with pytest.raises(DataValidationError, match=r"nope\.json does not exist .* Fix: give an"):
        resolve_deepspeed_config("launch/deepspeed/nope.json")


def test_zero2_launch_from_a_temporary_directory(small_store, elsewhere):
    """`accelerate launch --config_file $(latentcell launch-config zero2)` in a directory
    without launch/: a real 2-process ZeRO-2 run of a tiny VAE on CPU."""
    pytest.importorskip("deepspeed")
    config = launch_config("zero2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [accelerate_exe(), "launch", "--config_file", config, "--num_processes", "2",
           "--main_process_port", str(29400 + os.getpid() % 500), "-m", "latentcell.launch",
           "train", "vae"]  # fmt: skip
    for item in (f"data.path={small_store}", "run.dir=runs/vae", "train.max_steps=4",
                 "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
                 "data.batch_size=64", "model.n_hidden=32", "tracking.enabled=false"):  # fmt: skip
        cmd += ["--set", item]
    code, out = run(cmd, 300, cwd=elsewhere, env=env)
    assert code == 0, out[-4000:]
    summary = json.loads((elsewhere / "runs" / "vae" / "summary.json").read_text())
    assert summary["world_size"] == 2 and "DEEPSPEED" in summary["distributed_type"]
