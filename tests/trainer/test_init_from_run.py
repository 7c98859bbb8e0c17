"""Pretrain -> fine-tune across gene vocabularies (``trainer/init_from_run.py``), on real
stores and a real st-pretrain run whose hidden size EQUALS its gene count (so a loader that
guessed gene axes from shapes would permute transformer weights too):

- the same genes reordered: the fine-tuned model's first outputs are the pretrained model's
  outputs under the same permutation;
- an overlapping vocabulary: matched genes' rows and columns copied, new genes zero, new
  perturbation labels fresh, the counts reported;
- no gene in common: one error naming the fix;
- the report on the console, in summary.json and in MLflow;
- ``data build --genes-from RUN`` gives a store with the run's genes, in its order."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main
from latentcell.models.st_model import STModel
from latentcell.trainer.config import load_config
from latentcell.trainer.init_from_run import load_from_run
from latentcell.trainer.loop import fit
from latentcell.trainer.st_pretrain_stage import build_st_pretrain_model
from latentcell.trainer.st_stage import STRunConfig, STStage

G = 32  # genes, and the hidden size
GENE_AXES = {"cell_encoder.0.weight": 1, "head.weight": 0, "head.bias": 0}
TINY = [f"model.hidden={G}", "model.depth=1", "model.heads=2", "data.set_size=16",
        "data.sets_per_batch=4", "train.checkpoint_every=0", "train.progress=false",
        "tracking.enabled=false", "tracking.log_model=false"]  # fmt: skip


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _genes(store) -> list[str]:
    return [str(g) for g in open_store(store).meta.var.index]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A VCC h5ad of 32 genes; its store; an st-pretrain run on it (hidden 32); a store of
    the same genes shuffled; a store sharing 24 of them plus 3 genes the run never saw."""
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("init_from_run")
    h5ad = root / "cells.h5ad"
    synthesize(SynthConfig(n_cells=600, n_genes=G, n_perturbations=3, n_cell_types=1,
                           n_batches=2, seed=3), h5ad)  # fmt: skip
    store = build_store([h5ad], root / "a.zarr", schema="vcc", chunk_cells=100)
    genes = _genes(store)
    rng = np.random.default_rng(0)
    shuffled = [genes[i] for i in rng.permutation(G)]
    (root / "shuffled.txt").write_text("\n".join(shuffled))
    reordered = build_store([h5ad], root / "b.zarr", schema="vcc", chunk_cells=100,
                            genes_file=root / "shuffled.txt")  # fmt: skip
    overlap_genes = [genes[i] for i in rng.permutation(G)[:24]] + ["NEW1", "NEW2", "NEW3"]
    (root / "overlap.txt").write_text("\n".join(overlap_genes))
    with pytest.warns(UserWarning, match="occur in no input"):
        overlap = build_store([h5ad], root / "c.zarr", schema="vcc", chunk_cells=100,
                              genes_file=root / "overlap.txt")  # fmt: skip
    pre = root / "pre"
    overrides = [f"data.path={store}", f"run.dir={pre}", "data.val_fraction=0",
                 "train.max_steps=12", "train.eval_every=0", "optim.lr=3e-3",
                 "optim.warmup_steps=2", *TINY]  # fmt: skip
    assert main(["train", "st-pretrain", *_sets(*overrides)]) == 0
    card = json.loads((pre / "final" / "model_config.json").read_text())
    pretrained = build_st_pretrain_model(card)
    pretrained.load_state_dict(load_file(str(pre / "final" / "model.safetensors")))
    assert pretrained.head.weight.abs().max() > 0  # trained: not the zero-initialised head
    return SimpleNamespace(root=root, h5ad=h5ad, store=store, genes=genes, pre=pre,
                           pretrained=pretrained.eval(), reordered=reordered,
                           overlap=overlap)  # fmt: skip


def _stage(store, run_dir, init, *overrides: str) -> STStage:
    return STStage(load_config(STRunConfig, None, [
        f"data.path={store}", f"run.dir={run_dir}", f"init.run={init}",
        "model.cell_type_conditioning=false", "train.max_steps=2", "train.eval_every=0",
        "train.eval_batches=1", *TINY, *overrides,
    ]))  # fmt: skip


def _fine_tuned(world, store, tmp_path) -> tuple[STStage, STModel]:
    stage = _stage(store, tmp_path / "ft", world.pre)
    stage.prepare_data(True)
    torch.manual_seed(0)
    return stage, stage.build_model()


def test_reordered_genes_give_the_pretrained_outputs_permuted(world, tmp_path):
    stage, model = _fine_tuned(world, world.reordered, tmp_path)
    perm = [world.genes.index(g) for g in _genes(world.reordered)]
    assert perm != list(range(G))
    x = torch.log1p(torch.poisson(torch.full((3, 10, G), 2.0)))
    with torch.no_grad():
        before = world.pretrained.reconstruct(x)  # the pretraining's control label
        control = torch.full((3,), model.control_code)
        after = model.predict(x[..., perm], control)
    torch.testing.assert_close(after, before[..., perm], rtol=1e-5, atol=1e-6)

    report = stage.init_report()
    assert report["genes"] | {"new_keys": [], "dropped_keys": []} == {
        "run": G, "model": G, "matched": G, "new": 0, "dropped": 0, "order": "reordered",
        "new_keys": [], "dropped_keys": [],
    }  # fmt: skip
    # the gene axes are remapped; the hidden x hidden weights (32 x 32, like a gene axis)
    # load as they are; the one-label pretraining table maps onto the control's row
    remapped = set(report["tensors"]["remapped"])
    assert remapped == {*GENE_AXES, "perturbation.table.weight"}
    pretrained = world.pretrained.state_dict()
    square = [k for k, v in pretrained.items() if G in v.shape and k not in remapped]
    assert square and set(square) <= set(report["tensors"]["loaded"])
    own = model.state_dict()
    for name in square:
        torch.testing.assert_close(own[name], pretrained[name], rtol=0, atol=0)
    labels = report["labels"]["perturbation"]
    assert labels == {"run": 1, "model": 4, "matched": 1, "new": 3, "dropped": 0}


def test_overlapping_genes_copy_matched_rows_and_zero_new_ones(world, tmp_path):
    stage, model = _fine_tuned(world, world.overlap, tmp_path)
    torch.manual_seed(0)
    fresh = STModel(stage.model_config()).state_dict()  # what build_model started from
    own, pretrained = model.state_dict(), world.pretrained.state_dict()
    genes = _genes(world.overlap)
    for j, gene in enumerate(genes):
        for name, axis in GENE_AXES.items():
            mine = own[name].select(axis, j)
            if gene in world.genes:
                theirs = pretrained[name].select(axis, world.genes.index(gene))
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
            else:  # zero-filled: the new gene starts without effect on the encoding
                assert not mine.any(), (name, gene)
    labels = list(model.perturbation.labels)
    table = own["perturbation.table.weight"]
    control = labels.index("non-targeting")
    torch.testing.assert_close(table[control], pretrained["perturbation.table.weight"][0])
    others = [i for i in range(len(labels)) if i != control]
    torch.testing.assert_close(table[others], fresh["perturbation.table.weight"][others])

    report = stage.init_report()
    g = report["genes"]
    counts = [g[k] for k in ("run", "model", "matched", "new", "dropped", "order")]
    assert counts == [G, 27, 24, 3, 8, "overlap"]
    assert g["new_keys"] == ["NEW1", "NEW2", "NEW3"] and len(g["dropped_keys"]) == 8
    n = report["n_tensors"]
    assert n["remapped"] == 4 and n["loaded"] + n["remapped"] + n["fresh"] == len(own)
    assert report["console"][0].startswith(f"init.run {world.pre}")
    assert "genes 24 matched, 3 new (zero-filled), 8 dropped" in report["console"][0]


def test_gene_table_rows_map_by_perturbed_gene(world, tmp_path):
    """A gene_table encoder's rows are genes: they map by gene name across label sets."""
    stage = _stage(world.store, tmp_path / "gt", "", "model.perturbation_encoder=gene_table")
    fit(stage, stage.config)
    old_labels = stage.model_config().perturbation_labels
    old_genes = [label for label in old_labels if label != "non-targeting"]  # one gene each
    labels = ("non-targeting", old_genes[2], f"{old_genes[1]}+NEWGENE", "NEWGENE")
    torch.manual_seed(1)
    model = STModel(dataclasses.replace(stage.model_config(), perturbation_labels=labels))
    fresh = model.state_dict()["perturbation.table.weight"].clone()
    report = load_from_run(model, tmp_path / "gt", world.genes, {"perturbation": list(labels)})
    assert list(model.perturbation.genes) == [old_genes[2], old_genes[1], "NEWGENE"]
    trained = load_file(str(tmp_path / "gt" / "final" / "model.safetensors"))
    table, before = (
        model.state_dict()["perturbation.table.weight"],
        trained["perturbation.table.weight"],
    )
    torch.testing.assert_close(table[:2], before[[2, 1]], rtol=0, atol=0)
    torch.testing.assert_close(table[2], fresh[2], rtol=0, atol=0)  # NEWGENE: fresh
    assert report.labels["perturbation_gene"] == {
        "run": 3, "model": 3, "matched": 2, "new": 1, "dropped": 1,
    }  # fmt: skip
    assert report.genes["order"] == "equal" and "head.weight" in report.loaded


def test_no_gene_in_common_is_one_error(world, tmp_path):
    stage, model = _fine_tuned(world, world.reordered, tmp_path)
    meta = stage.meta
    categories = {"perturbation": meta.categories[meta.roles["perturbation"]]}
    with pytest.raises(DataValidationError, match="none of the run's 32 genes") as err:
        load_from_run(model, world.pre, [f"OTHER{i}" for i in range(G)], categories)
    assert "--genes-from" in str(err.value) and "\n" not in str(err.value)


def test_the_report_reaches_console_summary_and_mlflow(world, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stage = _stage(world.overlap, tmp_path / "ft", world.pre, "tracking.enabled=true",
                   f"tracking.uri={uri}")  # fmt: skip
    result = fit(stage, stage.config)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("init.run")]
    assert len(lines) == 2
    assert "genes 24 matched, 3 new (zero-filled), 8 dropped" in lines[0]
    assert "perturbation 1 matched, 3 new (fresh), 0 dropped" in lines[0]
    assert "4 remapped by key" in lines[1] and "cell_encoder.0.weight" in lines[1]

    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    init = summary["init"]
    assert init["genes"]["matched"] == 24 and init["console"] == lines
    assert "head.weight" in init["tensors"]["remapped"]
    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    params = run.data.params
    assert params["init.genes.matched"] == "24" and params["init.genes.new"] == "3"
    assert params["init.genes.dropped"] == "8" and params["init.n_tensors.remapped"] == "4"
    assert "init.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # the fine-tuned run's genes make the next store: --genes-from RUN, in the run's order
    card = json.loads((tmp_path / "ft" / "final" / "model_config.json").read_text())
    out = tmp_path / "from_run.zarr"
    capsys.readouterr()
    assert main(["data", "build", str(world.h5ad), "--out", str(out), "--schema", "vcc",
                 "--genes-from", str(tmp_path / "ft")]) == 0  # fmt: skip
    said = [x for x in capsys.readouterr().err.splitlines() if "occur in no input" in x]
    assert len(said) == 1 and said[0].startswith("warning: ")  # NEW1..3, one console line
    assert _genes(out) == card["genes"] == _genes(world.overlap)
    manifest = open_store(out).meta.manifest["build"]["genes"]
    assert manifest["genes_from_kind"] == "run" and manifest["genes_unknown"] == card["genes"][-3:]
