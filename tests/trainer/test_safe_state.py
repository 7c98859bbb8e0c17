"""The pickle-free state format: trees of tensors and JSON scalars round-trip exactly, anything
else is refused when saving, and reading a pickle (or any non-safetensors file) only fails."""

from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.trainer.safe_state import load_tree, rng_state, save_tree, set_rng_state


class Payload:
    """Unpickling this writes a marker file: proof that a loader ran code from a file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tree_round_trip_keeps_types_and_bits(tmp_path):
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), betas=(0.8, 0.9))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    tree = {
        "optimizer": opt.state_dict(),  # int keys, a tuple, 0-dim step tensors, None
        "odd keys": {"$tensor": 1, 3.5: [None, True]},
        "floats": [math.inf, -0.0, 1e-310, 0.1],
        "empty": [(), {}, []],
        "bf16": torch.randn(4, dtype=torch.bfloat16),
    }
    save_tree(tree, tmp_path / "t.safetensors")
    back = load_tree(tmp_path / "t.safetensors", "fix")
    assert back["odd keys"] == {"$tensor": 1, 3.5: [None, True]}
    assert back["empty"] == [(), {}, []]
    assert back["floats"][:1] == [math.inf] and str(back["floats"][1]) == "-0.0"
    assert back["floats"][2:] == [1e-310, 0.1]
    assert torch.equal(back["bf16"], tree["bf16"]) and back["bf16"].dtype == torch.bfloat16
    saved = opt.state_dict()
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == set(saved["state"]) == {0, 1}
    for pid, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][pid][key], value)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optimizer"])  # what resume does


@pytest.mark.parametrize(
    "bad", [np.zeros(3), object(), {"a": {1, 2}}, [b"bytes"], {(1, 2): 3}, torch.Size([2])]
)
def test_saving_refuses_what_would_need_pickle(tmp_path, bad):
    with pytest.raises(TypeError, match="cannot be saved without pickle|not a JSON scalar"):
        save_tree({"x": bad}, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("form", ["pickle", "torch.save", "truncated", "empty", "missing"])
def test_loading_anything_else_fails_without_running_it(tmp_path, form):
    marker = tmp_path / "MARKER"
    path = tmp_path / "t.safetensors"
    if form == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif form == "torch.save":
        torch.save({"x": Payload(marker)}, path)
    elif form == "truncated":
        save_tree({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:-7])
    elif form == "empty":
        path.write_bytes(b"")
    with pytest.raises(DataValidationError) as err:
        load_tree(path, "restore it")
    assert str(err.value).startswith(f"{path}: ") and str(err.value).endswith("Fix: restore it")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_plain_safetensors_file_or_a_forged_tree_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DataValidationError, match="latentcell.tree"):
        load_tree(tmp_path / "plain.safetensors", "fix")
    forged = {"latentcell.tree": '{"a": {"$tensor": "t9"}}'}
    save_file({"t0": torch.ones(1)}, str(tmp_path / "f.safetensors"), metadata=forged)
    with pytest.raises(DataValidationError, match="does not hold"):
        load_tree(tmp_path / "f.safetensors", "fix")
    forged = {"latentcell.tree": '{"a": {"$pickle": "x"}}'}
    save_file({}, str(tmp_path / "g.safetensors"), metadata=forged)
    with pytest.raises(DataValidationError, match="unknown tag"):
        load_tree(tmp_path / "g.safetensors", "fix")


def test_rng_state_round_trip_repeats_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(3)  # mid-stream, gauss cached
    save_tree(rng_state(), tmp_path / "rng.safetensors")
    first = (random.random(), random.gauss(0, 1), np.random.normal(), torch.randn(5))
    set_rng_state(load_tree(tmp_path / "rng.safetensors", "fix"))
    again = (random.random(), random.gauss(0, 1), np.random.normal(), torch.randn(5))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])
    state = load_tree(tmp_path / "rng.safetensors", "fix")
    state["numpy"]["key"] = state["numpy"]["key"][:10]
    with pytest.raises(ValueError, match="624"):
        set_rng_state(state)
