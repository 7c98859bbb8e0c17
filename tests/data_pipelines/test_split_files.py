"""``latentcell data split`` on a real store, through the real CLI: the files hold exactly the
split's cells (counts, obs, genes as the store has them), their provenance, and the controls
test predictions start from; the directory appears whole or not at all; bad split files are
one line."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pytest

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.perturbation_splits import assign_split, read_split_rows
from latentcell.data_pipelines.split_files import read_cells
from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main


def _labels(store) -> tuple[list[str], list[str]]:
    """(cell types, perturbations besides the control) of the store."""
    meta = open_store(store).meta
    types = meta.categories[meta.roles["cell_type"]]
    perts = [p for p in meta.categories[meta.roles["perturbation"]] if p != meta.control_label]
    return types, perts


def pair_split(store, path, iid: bool = True):
    """A held-out (cell type, perturbation) pair, with iid held-out cells (and controls)."""
    types, perts = _labels(store)
    cells = "[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n" if iid else ""
    path.write_text(
        f"[split]\nseed = 3\n{cells}[[split.perturbations]]\n"
        f'test = ["{perts[0]}"]\ncell_types = ["{types[1]}"]\n'
    )
    return path, types[1], perts[0]


def store_cells(store, rows: np.ndarray) -> dict:
    """The store's own view of ``rows``: counts, names and labels."""
    reader = open_store(store, names=True)
    block = reader.read_rows(0, reader.meta.n_cells).take(rows)
    meta = reader.meta
    label = {c: np.asarray(meta.categories[c])[block.codes[c]] for c in meta.categories}
    return {"X": block.X.toarray(), "names": block.names.astype(str), **label}


def test_files_hold_the_split_cells_with_provenance(small_store, tmp_path, capsys):
    split, held_type, held_pert = pair_split(small_store, tmp_path / "split.toml")
    out = tmp_path / "parts"
    assert main(["data", "split", "--store", str(small_store), "--split", str(split),
                 "--out", str(out)]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "train" in line[0] and "test_controls" in line[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "split.json", "split.npz", "test.h5ad", "test_controls.h5ad", "train.h5ad", "val.h5ad",
    ]  # fmt: skip

    expected = assign_split(small_store, split)
    rows = read_split_rows(out / "split.npz")
    for part in ("train", "val", "test"):
        assert np.array_equal(rows[part], expected.rows(part))
    meta = open_store(small_store).meta
    pert, ctype, control = meta.roles["perturbation"], meta.roles["cell_type"], meta.control_label

    files = {p: ad.read_h5ad(out / f"{p}.h5ad") for p in ("train", "val", "test", "test_controls")}
    for part in ("train", "val"):  # exactly the split's cells, in store order
        cells = store_cells(small_store, rows[part])
        adata = files[part]
        assert np.array_equal(adata.X.toarray(), cells["X"])
        assert list(adata.obs_names) == list(cells["names"])
        assert list(adata.obs[pert].astype(str)) == list(cells[pert])
    train = files["train"]
    assert train.X.dtype == np.float32 and np.array_equal(train.X.data, np.round(train.X.data))
    assert set(meta.obs_columns) <= set(train.obs.columns)  # original names: target_gene, ...
    assert list(train.var_names) == [str(g) for g in meta.var.index]
    assert list(train.var["gene_symbol"]) == [str(g) for g in meta.var["gene_symbol"]]
    # the held-out pair never trains; the perturbation does in the other cell type
    in_train = set(zip(train.obs[ctype].astype(str), train.obs[pert].astype(str), strict=True))
    assert (held_type, held_pert) not in in_train
    assert any(p == held_pert for _, p in in_train)

    # test controls: the held-out controls of every test cell type; test = test cells + them
    test, controls = files["test"], files["test_controls"]
    assert set(controls.obs[pert].astype(str)) == {control}
    assert set(controls.obs[ctype].astype(str)) == set(test.obs[ctype].astype(str))
    assert not set(controls.obs_names) & set(train.obs_names)  # held out, never trained on
    assert set(controls.obs_names) <= set(test.obs_names)
    assert test.n_obs == len(rows["test"])

    prov = controls.uns["latentcell_split"]
    text = split.read_text()
    assert prov["part"] == "test_controls" and prov["n_cells"] == controls.n_obs
    assert prov["split_toml"] == text
    assert prov["split_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert prov["store"] == str(small_store.absolute())
    assert prov["store_manifest_sha256"] == sha256_file(small_store / "manifest.json")
    assert dict(prov["roles"])["perturbation"] == pert and prov["control_label"] == control
    assert {k: int(v) for k, v in prov["counts"].items()} == {p: a.n_obs for p, a in files.items()}
    assert json.loads((out / "split.json").read_text()) == json.loads(expected.to_json())


def test_zero_shot_pair_predicts_from_training_controls(small_store, tmp_path):
    split, held_type, held_pert = pair_split(small_store, tmp_path / "split.toml", iid=False)
    out = tmp_path / "parts"
    assert main(["data", "split", "--store", str(small_store), "--split", str(split),
                 "--out", str(out)]) == 0  # fmt: skip
    assert not (out / "val.h5ad").exists()  # no val cells, no val file
    meta = open_store(small_store).meta
    pert, ctype = meta.roles["perturbation"], meta.roles["cell_type"]
    test = ad.read_h5ad(out / "test.h5ad")
    controls = ad.read_h5ad(out / "test_controls.h5ad")
    train = ad.read_h5ad(out / "train.h5ad")
    perturbed = test[test.obs[pert].astype(str) != meta.control_label]
    assert set(perturbed.obs[pert].astype(str)) == {held_pert}
    assert set(perturbed.obs[ctype].astype(str)) == {held_type}
    # nothing held out the controls: a zero-shot prediction starts from the training ones
    assert set(controls.obs[ctype].astype(str)) == {held_type}
    assert set(controls.obs_names) <= set(train.obs_names)
    assert dict(controls.uns["latentcell_split"]["test_controls_from"]) == {held_type: "train"}
    is_ctrl = (train.obs[pert].astype(str) == meta.control_label) & (
        train.obs[ctype].astype(str) == held_type
    )
    assert controls.n_obs == int(is_ctrl.sum())


def test_read_cells_matches_the_file(small_store, tmp_path):
    split, _, _ = pair_split(small_store, tmp_path / "split.toml")
    out = tmp_path / "parts"
    assert main(["data", "split", "--store", str(small_store), "--split", str(split),
                 "--out", str(out)]) == 0  # fmt: skip
    train = ad.read_h5ad(out / "train.h5ad")
    reader = open_store(small_store, names=True)
    memory = read_cells(reader, assign_split(reader, split).train)
    assert np.array_equal(memory.X.toarray(), train.X.toarray())
    assert memory.obs.astype(str).equals(train.obs.astype(str))


def test_existing_out_is_refused_and_replaced_only_with_overwrite(small_store, tmp_path, capsys):
    split, _, _ = pair_split(small_store, tmp_path / "split.toml")
    out = tmp_path / "parts"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    argv = ["data", "split", "--store", str(small_store), "--split", str(split), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "train.h5ad").exists()
    assert not list(tmp_path.glob("parts.tmp-*"))  # nothing left of the build


BAD_SPLITS = {
    "missing": (None, "no such split file"),
    "not_toml": ("[split\nseed = 0\n", "toml"),
    "unknown_key": ("[split]\nseed = 0\n[split.cels]\ntest_fraction = 0.2\n", "split.cels"),
    "unknown_label": (
        '[split]\n[split.perturbations]\ntest = ["NOT_A_GENE"]\n',
        "split.perturbations.test",
    ),
    "nothing_held_out": ("[split]\nseed = 0\n", "no rule holds anything out"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPLITS))
def test_bad_split_files_are_one_line(small_store, tmp_path, capsys, name):
    text, named = BAD_SPLITS[name]
    split = tmp_path / f"{name}.toml"
    if text is not None:
        split.write_text(text)
    out = tmp_path / "parts"
    code = main(["data", "split", "--store", str(small_store), "--split", str(split),
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert f"{name}.toml" in err and named in err and "Fix:" in err and "Traceback" not in err
    assert not out.exists()


def test_a_store_without_controls_gets_no_test_controls():
    import pandas as pd
    import scipy.sparse as sp

    from latentcell.data_pipelines.memory_source import InMemoryStore
    from latentcell.data_pipelines.perturbation_splits import SplitConfig
    from latentcell.data_pipelines.split_files import split_parts

    n = 300
    X = sp.random(n, 10, density=0.3, format="csr", random_state=0, dtype=np.float32)
    obs = pd.DataFrame({"tissue": np.repeat(["lung", "gut"], n // 2)}, index=map(str, range(n)))
    store = InMemoryStore.from_obs(X, obs, roles={"cell_type": "tissue"}, unit_cells=50)
    config = SplitConfig.from_dict({"split": {"cells": {"test_fraction": 0.2}}})
    split = assign_split(store, config)
    parts, origin = split_parts(store, split)
    assert sorted(parts) == ["test", "train"] and origin == {}
    assert np.array_equal(parts["test"], split.test)
    cells = read_cells(store, parts["test"])
    assert cells.n_obs == len(split.test) and list(cells.obs["tissue"].cat.categories)


def test_a_damaged_store_leaves_no_directory(small_store, tmp_path, capsys):
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(small_store, store)
    chunk = sorted((store / "X" / "data" / "c").iterdir())[-1]  # the last units' counts
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    split, _, _ = pair_split(small_store, tmp_path / "split.toml")
    out = tmp_path / "parts"
    code = main(["data", "split", "--store", str(store), "--split", str(split),
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "X/data" in err, err
    assert not out.exists() and not list(tmp_path.glob("parts.tmp-*"))  # all files or none
