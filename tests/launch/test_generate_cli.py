"""``latentcell generate`` and ``latentcell evaluate generation`` as a user runs them, through
``latentcell.launch.cli.main``, on a tiny VAE + DiT trained with ``latentcell train``.

Covered: the AnnData written (cells per condition, the store's genes in order, integer
counts, categorical obs with the store's categories, the sampling settings in ``uns``),
seeding (several seeds in one file, ``obs['sampling_seed']``), the VAE-prior baseline, sampler
options, bad input (exit 2, one ``error:`` line, nothing written), and scoring the generated
file against real cells of the store (per sampling seed when it holds several).
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
    return main(["generate", "--run", str(runs.dit), "--out", str(out), "--json", *extra])


def every_cell_type(runs, out: Path, *extra: str) -> ad.AnnData:
    """30 cells of every cell type, one seed (0) unless ``extra`` passes --seed."""
    argv = ["--n", "30", "--condition", "cell_type=*", "--seed", "0", *extra]
    assert generate(runs, out, *argv) == 0
    return ad.read_h5ad(out)


def test_generates_every_cell_type_in_the_store_vocabulary(runs, tmp_path, capsys):
    adata = every_cell_type(runs, tmp_path / "gen.h5ad")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(tmp_path / "gen.h5ad") and printed["n_cells"] == 60

    cell_types = runs.meta.categories["cell_type"]
    assert adata.shape == (60, 200)
    assert list(adata.var_names) == list(runs.meta.var.index)  # no input file: the keys
    for column in ("gene_id", "gene_symbol"):  # inference/gene_names.py
        assert list(adata.var[column]) == list(runs.meta.var[column])
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
    assert info["steps"] == 8 and info["guidance"] == 1.0  # the run's sampling defaults


def test_same_seed_same_cells(runs, tmp_path):
    first = every_cell_type(runs, tmp_path / "a.h5ad", "--seed", "3")
    again = every_cell_type(runs, tmp_path / "b.h5ad", "--seed", "3")
    other = every_cell_type(runs, tmp_path / "c.h5ad", "--seed", "4")
    assert (first.X != again.X).nnz == 0
    assert (first.X != other.X).nnz > 0
    assert first.uns["latentcell"]["seed"] == 3 and other.uns["latentcell"]["seed"] == 4


def test_several_seeds_in_one_file(runs, tmp_path, capsys):
    """--seed 0,1: each seed's cells as a run with that seed alone would sample them, tagged
    with obs['sampling_seed']; the default is three seeds."""
    both = every_cell_type(runs, tmp_path / "both.h5ad", "--seed", "0,1")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seeds"] == [0, 1]
    assert both.n_obs == 120 and both.obs_names.is_unique
    assert both.obs["sampling_seed"].dtype == np.int64
    assert both.obs["sampling_seed"].value_counts().to_dict() == {0: 60, 1: 60}
    assert list(both.uns["latentcell"]["seeds"]) == [0, 1]
    assert list(both.obs["cell_type"].cat.categories) == runs.meta.categories["cell_type"]
    assert both.obsm["X_latent"].shape == (120, 4)
    alone = every_cell_type(runs, tmp_path / "one.h5ad", "--seed", "1")
    assert (alone.obs["sampling_seed"] == 1).all()
    seed1 = (both.obs["sampling_seed"] == 1).to_numpy()
    assert (both.X[seed1] != alone.X).nnz == 0
    assert (both.X[~seed1] != alone.X).nnz > 0
    assert generate(runs, tmp_path / "default.h5ad", "--n", "4") == 0
    default = ad.read_h5ad(tmp_path / "default.h5ad")
    assert default.obs["sampling_seed"].value_counts().to_dict() == {0: 4, 1: 4, 2: 4}


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
    argv = ["--n", "7", "--condition", f"cell_type={label}", "--seed", "0"]
    assert generate(runs, tmp_path / "one.h5ad", *argv) == 0
    assert ad.read_h5ad(tmp_path / "one.h5ad").obs["cell_type"].tolist() == [label] * 7


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--n", "5", "--condition", "cell_type=NK cell"], "NK cell"),
        (["--n", "5", "--condition", "tissue=lung"], "tissue"),
        (["--n", "5", "--condition", "cell_type"], "KEY=VALUE"),
        (["--n", "0", "--condition", "cell_type=*"], "--n"),
        (["--n", "5", "--seed", "0,0"], "--seed"),
        (["--n", "5", "--seed", "1,x"], "--seed"),
    ],
    ids=["unknown-label", "unknown-key", "no-value", "zero-cells", "repeated-seed", "bad-seed"],
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


def _evaluate_every_cell_type(runs, tmp_path, *generate_args) -> tuple[dict, Path]:
    """Generated cells (``generate_args``) and a one-seed VAE-prior baseline, evaluated."""
    real = real_cells(runs.store, tmp_path / "real.h5ad")
    gen, prior = tmp_path / "gen.h5ad", tmp_path / "prior.h5ad"
    every_cell_type(runs, gen, *generate_args)
    every_cell_type(runs, prior, "--baseline", "vae-prior")
    out = tmp_path / "eval"
    argv = ["evaluate", "generation", "--generated", str(gen), "--real", str(real)]
    argv += ["--condition-col", "cell_type", "--out", str(out), "--baseline", f"vae_prior={prior}"]
    assert main([*argv, "--min-cells", "20", "--n-hvg", "100", "--n-pcs", "10"]) == 0
    return json.loads((out / "summary.json").read_text()), out


def test_evaluate_generation_scores_the_generated_cells(runs, tmp_path, capsys):
    summary, out = _evaluate_every_cell_type(runs, tmp_path)
    assert list(summary["methods"]) == ["generated", "vae_prior", "gaussian_pca", "real_ceiling"]
    assert sorted(summary["conditions"]) == sorted(runs.meta.categories["cell_type"])
    assert summary["n_pcs_used"] == 10
    assert (out / "pca_real_vs_generated.png").stat().st_size > 1000
    assert (out / "metrics_vs_baselines.png").stat().st_size > 1000
    assert "2 conditions evaluated" in capsys.readouterr().out


def test_evaluate_generation_reports_the_spread_over_seeds(runs, tmp_path, capsys):
    """A file of three seeds is scored per seed (beside a one-seed baseline, scored once)."""
    summary, _ = _evaluate_every_cell_type(runs, tmp_path, "--seed", "0,1,2")
    report = summary["seeds"]["methods"]
    assert list(report) == ["generated"] and report["generated"]["seeds"] == [0, 1, 2]
    per_seed = [v["macro"]["knn_auc"] for v in report["generated"]["per_seed"].values()]
    assert summary["methods"]["generated"]["macro"]["knn_auc"] == pytest.approx(np.mean(per_seed))
    assert report["generated"]["sd"]["knn_auc"] == pytest.approx(np.std(per_seed, ddof=1))
    printed = capsys.readouterr().out
    assert "generated: 3 sampling seeds (0, 1, 2)" in printed and "±" in printed


def test_unconditional_generation(runs, tmp_path):
    assert generate(runs, tmp_path / "gen.h5ad", "--n", "10") == 0
    assert ad.read_h5ad(tmp_path / "gen.h5ad").n_obs == 30  # 10 for each default seed
