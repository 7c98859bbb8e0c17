"""The console of a whole session, as a user sees it: data -> train -> export -> predict ->
evaluate prints our own lines (and ends with the next command), no library chatter; ``-v``
brings the chatter back (which also shows that the detector below catches it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# What third-party output looks like: Python warnings, DeepSpeed / MLflow / glog-style log
# lines, tqdm bars other than the training bar, MLflow's registry prints, ANSI colour codes.
THIRD_PARTY = re.compile(
    r"Warning\b|WARNING|\bINFO\b|^[WIE]\d{4} |\[W\d+|it/s\]|Iterating over|Running parallel"
    r"|Successfully registered|Created version|\x1b\[|Setting accelerator",
    re.MULTILINE,
)


def _cli(cwd: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LATENTCELL_VERBOSE", "TQDM_DISABLE", "TORCH_LOGS", "MLFLOW_LOGGING_LEVEL"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "latentcell.launch", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout + done.stderr).replace("\r", "\n")


def _third_party(text: str) -> list[str]:
    return [line for line in text.splitlines() if THIRD_PARTY.search(line)]


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("console")
    _cli(root, "data", "synth", "--out", "c.h5ad", "--cells", "900", "--genes", "60",
         "--perturbations", "3", "--cell-types", "2")  # fmt: skip
    _cli(root, "data", "build", "c.h5ad", "--out", "c.zarr", "--schema", "vcc")
    (root / "split.toml").write_text(
        "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.3\n"
    )
    _cli(root, "data", "split", "--store", "c.zarr", "--split", "split.toml", "--out", "parts")
    return root


TINY_VAE = ("--set", "data.path=c.zarr", "--set", "model.n_hidden=16", "--set",
            "train.max_steps=5", "--set", "train.eval_every=0", "--set",
            "train.checkpoint_every=0", "--set", "data.batch_size=64")  # fmt: skip


def test_a_session_prints_only_our_lines(session):
    pytest.importorskip("cell_eval")
    text = _cli(session, "train", "st", "--set", "data.path=c.zarr", "--set",
                "split.file=split.toml", "--set", "run.dir=st", "--set", "data.set_size=16",
                "--set", "data.sets_per_batch=4", "--set", "model.hidden=16", "--set",
                "model.depth=1", "--set", "model.heads=2", "--set", "train.max_steps=5",
                "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0")  # fmt: skip
    assert "next: latentcell predict --run st" in text and "latentcell export --run st" in text
    text += _cli(session, "export", "--run", "st", "--out", "st_bundle")
    assert "next: python -m latentcell.export.runtime predict --bundle st_bundle" in text
    text += _cli(session, "predict", "--run", "st", "--controls", "parts/test.h5ad",
                 "--perturbations", "all", "--cells-per-perturbation", "10",
                 "--out", "pred.h5ad")  # fmt: skip
    assert "next: latentcell evaluate perturbation --pred pred.h5ad" in text
    text += _cli(session, "evaluate", "perturbation", "--pred", "pred.h5ad", "--real",
                 "parts/test.h5ad", "--train", "parts/train.h5ad", "--out", "ev",
                 "--profile", "minimal")  # fmt: skip
    assert _third_party(text) == []


def test_verbose_shows_the_libraries_and_json_keeps_scripts_working(session):
    quiet = _cli(session, "train", "vae", *TINY_VAE, "--set", "run.dir=vae_quiet", "--json")
    assert _third_party(quiet) == []
    summary = json.loads(next(x for x in quiet.splitlines() if x.startswith("{")))
    assert summary["run_dir"] == "vae_quiet" and summary["step"] == 5
    loud = _cli(session, "-v", "train", "vae", *TINY_VAE, "--set", "run.dir=vae_loud")
    loud += _cli(session, "export", "--run", "vae_loud", "--out", "vae_bundle", "--verbose")
    assert len(_third_party(loud)) >= 2, loud[-3000:]
