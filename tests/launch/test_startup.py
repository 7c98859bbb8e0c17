"""What the CLI imports before it does anything: ``latentcell --help`` and ``data inspect`` must
not pay for torch, anndata, mlflow, accelerate, scipy.stats or cell-eval (seconds each), so a
command's heavy modules load only when that command runs (``lazy_commands``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "accelerate", "deepspeed", "anndata", "scipy", "sklearn",
         "cell_eval", "webdataset", "onnx", "onnxruntime", "zarr", "pandas", "matplotlib")  # fmt: skip

PROBE = """
import json, sys
from latentcell.launch.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
sys.stdout.flush()
loaded = sorted({m.split(".")[0] for m in sys.modules})
print("\\nMODULES " + json.dumps({"code": code, "loaded": loaded}))
"""


def _probe(*argv: str) -> tuple[int, set[str], str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert "MODULES " in done.stdout, done.stderr
    text, _, tail = done.stdout.rpartition("MODULES ")
    report = json.loads(tail)
    return report["code"], set(report["loaded"]), text


@pytest.mark.parametrize(
    "argv", [("--help",), ("data", "--help"), ("benchmark", "--help"), ("evaluate", "--help"),
             ("train", "--help"), ("version",)],
)  # fmt: skip
def test_parser_imports_nothing_heavy(argv):
    code, loaded, text = _probe(*argv)
    assert code == 0, text
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_lists_every_command():
    code, _, text = _probe("--help")
    for command in ("data", "train", "generate", "predict", "evaluate", "export", "benchmark",
                    "demo", "version"):  # fmt: skip
        assert command in text


def test_data_inspect_reads_the_store_without_torch(small_store):
    code, loaded, text = _probe("data", "inspect", str(small_store))
    assert code == 0, text
    assert "n_cells: 1200" in text
    too_heavy = {"torch", "mlflow", "accelerate", "anndata", "sklearn", "webdataset", "cell_eval"}
    assert not loaded & too_heavy, sorted(loaded & too_heavy)


def test_train_family_help_lists_its_config_sections():
    code, _, text = _probe("train", "vae", "--help")
    assert code == 0, text
    for section in ("[run]", "[data]", "[model]", "[optim]", "[train]", "[tracking]"):
        assert section in text
    assert "n_latent=10" in text  # a key with its default


def test_data_synth_help_shows_defaults():
    code, _, text = _probe("data", "synth", "--help")
    assert code == 0, text
    assert "(default: 10000)" in text and "(default: 0)" in text


def test_a_lazy_command_still_rejects_unknown_options():
    code, _, _ = _probe("data", "inspect", "--no-such-option", "x")
    assert code == 2
