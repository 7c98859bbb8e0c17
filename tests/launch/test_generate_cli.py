"""``latentcell generate`` and ``latentcell evaluate generation`` as a user runs them, through
``latentcell.launch.cli.main``, on a tiny VAE + DiT trained with ``latentcell train``.

Covered: the AnnData written (cells per condition, the store's genes in order, integer
counts, categorical obs with the store's categories, the sampling settings in ``uns``),
seeding, the VAE-prior baseline, sampler options, bad input (exit 2, one ``error:`` line,
nothing written), and scoring the generated file against real cells of the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.data_pipelines.stores import open_store
from latentcell.launch.cli import main


def _reset_accelerate() -> None:
    """Each in-process ``train`` needs a fresh Accelerate state (process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(stage: str, *overrides: str) -> None:
    common = ("train.progress=false", "train.checkpoint_every=0", "train.eval_every=0")
    argv = ["train", stage]
    for item in (*common, "tracking.enabled=false", "data.batch_size=128", *overrides):
        argv += ["--set", item]
    try:
        assert main(argv) == 0
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def runs(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    vae, dit = root / "vae", root / "dit"
    _train(
        "vae",
        f"data.path={small_store}",
        f"run.dir={vae}",
        "model.n_latent=4",
        "model.n_hidden=32",
        "model.kl_warmup_steps=20",
        "optim.lr=3e-3",
        "train.max_steps=60",
    )
    _train(
        "dit",
        f"data.path={small_store}",
        f"run.dir={dit}",
        f"vae.run={vae}",
        "model.hidden=32",
        "model.depth=1",
        "model.heads=2",
        "model.patch_size=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
        "train.max_steps=80",
        "train.ema_decay=0.9",  # generation loads the EMA: let it follow a short run
        "diffusion.sample_steps=8",
    )
    meta = open_store(small_store).meta
    return SimpleNamespace(store=small_store, dit=dit, meta=meta)


def generate(runs, out: Path, *extra: str) -> int:
    return main(["generate", "--run", str(runs.dit), "--out", str(out), *extra])


def every_cell_type(runs, out: Path, *extra: str) -> ad.AnnData:
    assert generate(runs, out, "--n", "30", "--condition", "cell_type=*", *extra) == 0
    return ad.read_h5ad(out)


def test_generates_every_cell_type_in_the_store_vocabulary(runs, tmp_path, capsys):
    adata = every_cell_type(runs, tmp_path / "gen.h5ad")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(tmp_path / "gen.h5ad") and printed["n_cells"] == 60

    cell_types = runs.meta.categories["cell_type"]
    assert adata.shape == (60, 200)
    assert list(adata.var_names) == list(runs.meta.var.index)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["cell_type"].cat.categories) == cell_types
    assert adata.obs["cell_type"].value_counts().to_dict() == dict.fromkeys(cell_types, 30)
    X = adata.X.toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and X.sum() > 0
    assert (adata.obs["library_size"] >= 1).all()
    # the VAE decodes per batch: every cell got a batch from its cell type's training mix
    assert set(adata.obs["batch"].cat.categories) == set(runs.meta.categories["batch"])
    assert adata.obsm["X_latent"].shape == (60, 4)  # model.n_latent=4
    info = adata.uns["latentcell"]
    assert info["source"] == "dit" and info["seed"] == 0 and info["library"] == "latent"
    assert info["steps"] == 8 and info["guidance"] == 2.0  # the run's sampling defaults


def test_same_seed_same_cells(runs, tmp_path):
    first = every_cell_type(runs, tmp_path / "a.h5ad", "--seed", "3")
    again = every_cell_type(runs, tmp_path / "b.h5ad", "--seed", "3")
    other = every_cell_type(runs, tmp_path / "c.h5ad", "--seed", "4")
    assert (first.X != again.X).nnz == 0
    assert (first.X != other.X).nnz > 0
    assert first.uns["latentcell"]["seed"] == 3 and other.uns["latentcell"]["seed"] == 4


def test_library_modes_share_the_latents_and_differ_in_depth(runs, tmp_path):
    linked = every_cell_type(runs, tmp_path / "linked.h5ad", "--seed", "5")
    plain = every_cell_type(runs, tmp_path / "plain.h5ad", "--seed", "5", "--library", "condition")
    assert plain.uns["latentcell"]["library"] == "condition"
    np.testing.assert_array_equal(linked.obsm["X_latent"], plain.obsm["X_latent"])
    assert not np.array_equal(linked.obs["library_size"], plain.obs["library_size"])


def test_vae_prior_baseline(runs, tmp_path):
    adata = every_cell_type(runs, tmp_path / "prior.h5ad", "--baseline", "vae-prior")
    assert adata.uns["latentcell"]["source"] == "vae_prior"
    assert adata.obs["cell_type"].value_counts().tolist() == [30, 30]
    dit = every_cell_type(runs, tmp_path / "dit.h5ad")
    assert (adata.X != dit.X).nnz > 0  # other latents, same seed


def test_sampler_options_are_recorded(runs, tmp_path):
    adata = every_cell_type(runs, tmp_path / "gen.h5ad", "--steps", "5", "--guidance", "1.0")
    assert adata.uns["latentcell"]["steps"] == 5 and adata.uns["latentcell"]["guidance"] == 1.0
    label = runs.meta.categories["cell_type"][1]
    assert (
        generate(runs, tmp_path / "one.h5ad", "--n", "7", "--condition", f"cell_type={label}") == 0
    )
    assert ad.read_h5ad(tmp_path / "one.h5ad").obs["cell_type"].tolist() == [label] * 7


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--n", "5", "--condition", "cell_type=NK cell"], "NK cell"),
        (["--n", "5", "--condition", "tissue=lung"], "tissue"),
        (["--n", "5", "--condition", "cell_type"], "KEY=VALUE"),
        (["--n", "0", "--condition", "cell_type=*"], "--n"),
    ],
    ids=["unknown-label", "unknown-key", "no-value", "zero-cells"],
)
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, capsys, args, named):
    assert generate(runs, tmp_path / "gen.h5ad", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert list(tmp_path.iterdir()) == []


def real_cells(store: Path, out: Path) -> Path:
    """The store's cells as an h5ad of raw counts with cell_type labels."""
    reader = open_store(store, names=True)
    block = reader.read_rows(0, reader.meta.n_cells)
    labels = pd.Categorical.from_codes(
        block.codes["cell_type"], reader.meta.categories["cell_type"]
    )
    obs = pd.DataFrame({"cell_type": labels}, index=pd.Index(block.names.astype(str)))
    ad.AnnData(X=block.X, obs=obs, var=pd.DataFrame(index=reader.meta.var.index)).write_h5ad(out)
    return out


def test_evaluate_generation_scores_the_generated_cells(runs, tmp_path, capsys):
    real = real_cells(runs.store, tmp_path / "real.h5ad")
    gen, prior = tmp_path / "gen.h5ad", tmp_path / "prior.h5ad"
    every_cell_type(runs, gen)
    every_cell_type(runs, prior, "--baseline", "vae-prior")
    out = tmp_path / "eval"
    argv = ["evaluate", "generation", "--generated", str(gen), "--real", str(real)]
    argv += ["--condition-col", "cell_type", "--out", str(out), "--baseline", f"vae_prior={prior}"]
    assert main([*argv, "--min-cells", "20", "--n-hvg", "100", "--n-pcs", "10"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["generated", "vae_prior", "gaussian_pca", "real_ceiling"]
    assert sorted(summary["conditions"]) == sorted(runs.meta.categories["cell_type"])
    assert summary["n_pcs_used"] == 10
    assert (out / "pca_real_vs_generated.png").stat().st_size > 1000
    assert (out / "metrics_vs_baselines.png").stat().st_size > 1000
    assert "2 conditions evaluated" in capsys.readouterr().out


def test_unconditional_generation(runs, tmp_path):
    assert generate(runs, tmp_path / "gen.h5ad", "--n", "10") == 0
    assert ad.read_h5ad(tmp_path / "gen.h5ad").n_obs == 10
