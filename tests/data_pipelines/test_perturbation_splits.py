"""Perturbation splits: TOML schema and errors, iid / zero-shot / cell-type rules, and no leak
of val/test cells into a SetSampler restricted to the training rows."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.memory_source import InMemoryStore
from latentcell.data_pipelines.perturbation_splits import (
    CellHoldout,
    PerturbationSplit,
    SplitConfig,
    assign_split,
    load_split_config,
)
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig

pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")

CELL_TYPES = ("A", "B", "C")
PERTS = ("ctrl", "g1", "g2", "g3", "g4", "g5")
BATCHES = ("b0", "b1", "b2")


def _store(seed: int = 0) -> InMemoryStore:
    """About 1,000 cells: every (cell type, perturbation, batch) with 5-35 cells, sorted."""
    rng = np.random.default_rng(seed)
    keys = [
        (ct, pt, bt)
        for ct in CELL_TYPES
        for pt in PERTS
        for bt in BATCHES
        for _ in range(int(rng.integers(5, 36)))
    ]
    keys = [keys[i] for i in rng.permutation(len(keys))]
    obs = pd.DataFrame(keys, columns=["ct", "pert", "bt"])
    X = sp.random(len(obs), 8, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    store = InMemoryStore.from_obs(
        X,
        obs,
        roles={"cell_type": "ct", "perturbation": "pert", "batch": "bt"},
        control_label="ctrl",
        unit_cells=64,
    )
    return store.sorted_by_group()


@pytest.fixture(scope="module")
def store() -> InMemoryStore:
    return _store()


def _labels(store: InMemoryStore, role: str) -> np.ndarray:
    col = store.meta.roles[role]
    return np.asarray(store.meta.categories[col], dtype=object)[store.codes[col]]


def _write(tmp_path: Path, text: str, name: str = "split.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _check_partition(split: PerturbationSplit, n_cells: int) -> None:
    for rows in (split.train, split.val, split.test):
        assert rows.dtype == np.int64 and (np.diff(rows) > 0).all()
    together = np.concatenate([split.train, split.val, split.test])
    assert len(together) == n_cells  # disjoint (sorted, no repeats) and complete
    assert np.array_equal(np.sort(together), np.arange(n_cells))


# -- schema --------------------------------------------------------------------------------


def test_native_schema(tmp_path):
    path = _write(
        tmp_path,
        """
        [split]
        seed = 3
        [split.cells]
        val_fraction = 0.1
        test_fraction = 0.2
        [[split.perturbations]]
        test = ["g1"]
        n_val = 1
        [[split.perturbations]]
        test = ["g2"]
        cell_types = ["B"]
        [split.cell_types]
        test = ["C"]
        """,
    )
    config = load_split_config(path)
    assert config.seed == 3 and config.path == str(path)
    assert config.cells == CellHoldout(0.1, 0.2)
    assert [r.test for r in config.perturbations] == [("g1",), ("g2",)]
    assert config.perturbations[0].n_val == 1 and config.perturbations[0].cell_types is None
    assert config.perturbations[1].cell_types == ("B",)
    assert config.cell_types.test == ("C",) and config.cell_types.val == ()
    assert SplitConfig.from_dict({"split": config.to_dict()}, path) == config


def test_cell_load_schema_is_translated(tmp_path, store):
    path = _write(
        tmp_path,
        """
        [datasets]
        screen = "/data/screen"
        [training]
        screen = "train"
        [zeroshot]
        "screen.C" = "test"
        [fewshot]
        [fewshot."screen.B"]
        val = ["g3"]
        test = ["g1", "g2"]
        """,
    )
    config = load_split_config(path)
    assert config.cell_types.test == ("C",)
    (rule,) = config.perturbations
    assert rule.cell_types == ("B",) and rule.test == ("g1", "g2") and rule.val == ("g3",)
    native = SplitConfig.from_dict(
        {
            "split": {
                "cell_types": {"test": ["C"]},
                "perturbations": {"test": ["g1", "g2"], "val": ["g3"], "cell_types": ["B"]},
            }
        }
    )
    a, b = assign_split(store, config), assign_split(store, native)
    for name in ("train", "val", "test"):
        assert np.array_equal(a.rows(name), b.rows(name))


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("[split.cells]\ntest_fracton = 0.2", "split.cells.test_fracton", "test_fraction"),
        ("[split.cells]\ntest_fraction = 1.5", "split.cells.test_fraction", "outside [0, 1)"),
        ("[split.cells]\nval_fraction = -0.1", "split.cells.val_fraction", "outside [0, 1)"),
        ("[split.cells]\ntest_fraction = '0.2'", "split.cells.test_fraction", "a number"),
        (
            "[split.cells]\nval_fraction = 0.5\ntest_fraction = 0.5",
            "split.cells",
            "no training cells",
        ),
        ("[split]\nseed = -1\n[split.cells]\ntest_fraction = 0.2", "split.seed", ">= 0"),
        (
            "[split.perturbations]\ntest = ['g1']\nn_test = 2",
            "split.perturbations.n_test",
            "both test",
        ),
        (
            "[split.perturbations]\ntest = ['g1']\nval = ['g1']",
            "split.perturbations.val",
            "both val and test",
        ),
        ("[split.perturbations]\ntest = 'g1'", "split.perturbations.test", "list of strings"),
        ("[split.perturbations]\ntest = ['g1', 'g1']", "split.perturbations.test", "twice"),
        ("[split.cell_types]\ntest = ['A']\nval = ['A']", "split.cell_types.val", "both"),
        ("[split]\nseed = 1", "split", "no rule holds anything out"),
        ("[splits.cells]\ntest_fraction = 0.2", "<top level>.splits", "unknown key"),
        ('[zeroshot]\n"ds.A" = "train"', 'zeroshot."ds.A"', "not a held-out split"),
        ("[split.cells\ntest_fraction = 0.2", "toml", "not valid TOML"),
    ],
)
def test_schema_errors_name_file_field_and_fix(tmp_path, text, field, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataValidationError) as info:
        load_split_config(path)
    err = info.value
    assert err.path == str(path) and err.field == field and err.fix
    assert message in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(DataValidationError, match="no such split file"):
        load_split_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("split", "field", "message"),
    [
        ({"perturbations": {"test": ["g9"]}}, "split.perturbations.test", "'g1', 'g2'"),
        ({"perturbations": {"test": ["g11"]}}, "split.perturbations.test", "did you mean"),
        ({"perturbations": {"val": ["ctrl"]}}, "split.perturbations.val", "control label"),
        (
            {"perturbations": {"test": ["g1"], "cell_types": ["D"]}},
            "split.perturbations.cell_types",
            "['A', 'B', 'C']",
        ),
        ({"cell_types": {"test": ["D"]}}, "split.cell_types.test", "['A', 'B', 'C']"),
        ({"perturbations": {"n_test": 4, "n_val": 2}}, "split.perturbations.n_test", "only 5"),
        ({"cell_types": {"test": ["A", "B"], "val": ["C"]}}, "split", "every one of"),
    ],
)
def test_names_checked_against_the_store(store, split, field, message):
    config = SplitConfig.from_dict({"split": split}, "my_split.toml")
    with pytest.raises(DataValidationError) as info:
        assign_split(store, config)
    assert info.value.path == "my_split.toml" and info.value.field == field
    assert message in str(info.value)


# -- rules ---------------------------------------------------------------------------------


def _config(**split) -> SplitConfig:
    return SplitConfig.from_dict({"split": split})


def test_deterministic_and_seeded(store):
    config = _config(seed=5, cells={"val_fraction": 0.1, "test_fraction": 0.2})
    a, b = assign_split(store, config), assign_split(store, config)
    assert all(np.array_equal(a.rows(s), b.rows(s)) for s in ("train", "val", "test"))
    assert a.to_json() == b.to_json()
    other = assign_split(store, _config(seed=6, cells={"val_fraction": 0.1, "test_fraction": 0.2}))
    assert not np.array_equal(a.test, other.test)
    picks = {
        assign_split(store, _config(seed=s, perturbations={"n_test": 2})).test_perturbations
        for s in range(6)
    }
    assert len(picks) > 1 and all(len(p) == 2 and "ctrl" not in p for p in picks)


def test_iid_holds_out_a_fraction_of_every_group_including_controls(store):
    split = assign_split(store, _config(seed=1, cells={"val_fraction": 0.1, "test_fraction": 0.2}))
    _check_partition(split, store.meta.n_cells)
    label = np.zeros(store.meta.n_cells, dtype=int)
    label[split.val], label[split.test] = 1, 2
    frame = pd.DataFrame(
        {"ct": _labels(store, "cell_type"), "pt": _labels(store, "perturbation"), "lab": label}
    )
    frame["bt"] = _labels(store, "batch")
    for (ct, pt), group in frame.groupby(["ct", "pt"]):
        n = len(group)
        assert (group["lab"] == 2).sum() == int(np.floor(0.2 * n + 0.5)), (ct, pt)
        assert (group["lab"] >= 1).sum() == int(np.floor(0.3 * n + 0.5)), (ct, pt)
        # per cell, not a contiguous block (groups are sorted by batch inside)
        held = group.index[group["lab"] == 2].to_numpy()
        assert len(held) < 2 or (np.diff(held) > 1).any(), (ct, pt)
    share = frame.groupby("bt")["lab"].apply(lambda lab: (lab == 2).mean())
    assert share.between(0.15, 0.25).all()  # so every batch loses about its share
    assert split.summary["splits"]["test"]["control_cells"] > 0  # test predictions start here
    assert split.test_perturbations == () and split.test_cell_types == ()


def test_zero_shot_perturbations(store):
    split = assign_split(store, _config(perturbations={"test": ["g1", "g4"], "val": ["g2"]}))
    _check_partition(split, store.meta.n_cells)
    pert = _labels(store, "perturbation")
    assert set(np.flatnonzero(np.isin(pert, ["g1", "g4"]))) == set(split.test)
    assert set(np.flatnonzero(pert == "g2")) == set(split.val)
    assert not np.isin(pert[split.train], ["g1", "g2", "g4"]).any()
    assert set(np.flatnonzero(pert == "ctrl")) <= set(split.train)  # controls are not held out
    assert split.test_perturbations == ("g1", "g4") and split.val_perturbations == ("g2",)
    summary = json.loads(split.to_json())
    assert summary["splits"]["test"]["perturbations"] == ["g1", "g4"]
    assert summary["splits"]["test"]["control_cells"] == 0
    assert summary["splits"]["train"]["perturbations"] == ["g3", "g5"]
    cells = {s: summary["splits"][s]["cells"] for s in ("train", "val", "test")}
    assert cells == {"train": len(split.train), "val": len(split.val), "test": len(split.test)}


def test_zero_shot_scoped_to_cell_types(store):
    split = assign_split(store, _config(perturbations={"test": ["g1"], "cell_types": ["B"]}))
    pert, ct = _labels(store, "perturbation"), _labels(store, "cell_type")
    assert set(np.flatnonzero((pert == "g1") & (ct == "B"))) == set(split.test)
    assert ((pert[split.train] == "g1") & (ct[split.train] != "B")).sum() > 0


def test_held_out_cell_types(store):
    split = assign_split(store, _config(cell_types={"test": ["C"], "val": ["B"]}))
    _check_partition(split, store.meta.n_cells)
    ct = _labels(store, "cell_type")
    assert set(np.flatnonzero(ct == "C")) == set(split.test)  # controls included
    assert set(np.flatnonzero(ct == "B")) == set(split.val)
    assert set(ct[split.train]) == {"A"}
    assert split.test_cell_types == ("C",) and split.val_cell_types == ("B",)


def test_combined_rules_take_the_strictest_split(store):
    split = assign_split(
        store,
        _config(
            seed=2,
            cells={"test_fraction": 0.25},
            perturbations={"test": ["g1"]},
            cell_types={"val": ["C"]},
        ),
    )
    _check_partition(split, store.meta.n_cells)
    pert, ct = _labels(store, "perturbation"), _labels(store, "cell_type")
    g1, type_c = pert == "g1", ct == "C"
    assert set(np.flatnonzero(g1)) <= set(split.test)  # test beats the val cell type
    assert set(np.flatnonzero(type_c & ~g1)) == set(split.val)  # iid leaves held-out groups
    rest_test = np.setdiff1d(split.test, np.flatnonzero(g1))
    assert len(rest_test) and not type_c[rest_test].any()  # iid test cells elsewhere
    assert (pert[rest_test] == "ctrl").any()


# -- the leak test -------------------------------------------------------------------------


def _leak_split(reader) -> PerturbationSplit:
    perts = reader.meta.categories[reader.meta.roles["perturbation"]]
    held = [p for p in perts if p != reader.meta.control_label][:1]
    return assign_split(
        reader,
        _config(
            seed=4,
            cells={"val_fraction": 0.15, "test_fraction": 0.2},
            perturbations={"test": held},
        ),
    )


def _emitted(pairs) -> tuple[set[int], set[int]]:
    perturbed, controls = set(), set()
    for pair in pairs:
        perturbed.update(pair["perturbed"]["row"].tolist())
        controls.update(pair["control"]["row"].tolist())
    return perturbed, controls


def _assert_no_leak(reader, split, perturbed, controls):
    held_out = set(split.val.tolist()) | set(split.test.tolist())
    assert not perturbed & held_out and not controls & held_out
    train = split.train
    pert = reader.group_index()
    # every training cell of every perturbed group was a member of some set: the sampler saw
    # the whole training subset and nothing else
    ctrl_code = reader.meta.categories[reader.meta.roles["perturbation"]].index(
        reader.meta.control_label
    )
    perturbed_rows = np.concatenate(
        [
            np.arange(a, b)
            for a, b, p in zip(pert["start"], pert["stop"], pert["perturbation"], strict=True)
            if p != ctrl_code
        ]
    )
    assert perturbed == set(np.intersect1d(perturbed_rows, train).tolist())
    assert controls and controls <= set(train.tolist())


@pytest.mark.parametrize("tail", ["partial", "pad"])
def test_sampler_on_train_rows_never_emits_val_or_test_cells(store, tail):
    split = _leak_split(store)
    config = SetSamplerConfig(set_size=16, seed=3, tail=tail)
    pairs = list(SetSampler(store, config, rows=split.train))
    assert pairs
    _assert_no_leak(store, split, *_emitted(pairs))
    with pytest.raises(AssertionError):  # the check does catch an unrestricted sampler
        _assert_no_leak(store, split, *_emitted(SetSampler(store, config)))
    # 2 ranks x 2 DataLoader workers: the restricted sampler is pickled into the workers
    sharded = []
    for rank in range(2):
        sampler = SetSampler(
            store, config, rank=rank, world_size=2, num_workers=2, rows=split.train
        )
        sharded += list(sampler.loader())
    _assert_no_leak(store, split, *_emitted(sharded))
    real = sorted(int(p["set_id"]) for p in sharded if not p["is_pad"])
    assert real == list(range(SetSampler(store, config, rows=split.train).n_sets))


def test_no_leak_on_a_real_zarr_store(small_store):
    from latentcell.data_pipelines.stores import open_store

    reader = open_store(small_store)
    split = _leak_split(reader)
    _check_partition(split, reader.meta.n_cells)
    sampler = SetSampler(
        partial(open_store, small_store),
        SetSamplerConfig(set_size=32, seed=0, tail="partial", output="csr"),
        rows=split.train,
    )
    for epoch in range(2):
        sampler.set_epoch(epoch)
        _assert_no_leak(reader, split, *_emitted(sampler))
