"""The steps of ``latentcell benchmark generation``: cells in, held-out split, models, one
evaluation per (training seed, sampling seed). See ``generation`` for the protocol."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.read_h5ad import read_h5ad
from latentcell.evaluation.protocol import (
    CONDITION_JOIN,
    check_condition_column,
    check_counts,
    condition_columns,
)

SYNTHETIC_CONDITIONS = "cell_type,target_gene"
# The VAE of the generation recipe (the DiT uses `train dit`'s defaults as they are): 16 latent
# dims (4 tokens of 4 at the DiT's default patch size), smaller batches and a higher rate than
# `train vae`'s atlas-scale defaults, which are sized for 50,000 steps over millions of cells.
GENERATION_VAE = (
    "model.n_latent=16",
    "data.batch_size=128",
    "optim.lr=0.002",
    "train.eval_every=500",
)


@dataclass(frozen=True)
class Cells:
    """The input's cells with only what the benchmark uses in obs (labels as strings)."""

    adata: ad.AnnData
    source: str
    columns: list[str]  # the condition columns
    classifier_col: str | None  # None: the conditions

    @property
    def groups(self) -> np.ndarray:
        return group_labels(self.adata.obs, self.columns)


@dataclass(frozen=True)
class HeldOutSplit:
    cells: Cells
    train: ad.AnnData
    held: ad.AnnData
    store: Path


@dataclass(frozen=True)
class TrainedModels:
    """One training seed's DiT, loaded once for all its sampling seeds, with the VAE latents
    of the training and held-out cells that the memorization check compares with."""

    dit_dir: Path
    generator: object  # trainer.generate.CellGenerator
    train_latents: np.ndarray
    held_latents: np.ndarray


def group_labels(obs: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One label per cell: its condition columns' values joined (as the evaluator does)."""
    parts = [obs[c].astype(str).to_numpy() for c in columns]
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out + CONDITION_JOIN + p
    return out.astype(str)


def load_cells(args: argparse.Namespace, out: Path) -> Cells:
    """The input h5ad (or synthetic cells), checked: condition columns, raw counts."""
    if args.data:
        if not args.condition_col:
            raise DataValidationError(
                args.data, "--condition-col", "not given",
                "pass the obs column(s) to condition on, e.g. --condition-col cell_type",
            )  # fmt: skip
        path, condition_col = Path(args.data), args.condition_col
    else:
        path, condition_col = _synthesize(args, out), args.condition_col or SYNTHETIC_CONDITIONS
    adata = read_h5ad(path, "--data")
    check_condition_column(adata, str(path), condition_col)
    columns = condition_columns(condition_col)
    keep = list(dict.fromkeys([*columns, *([args.classifier_col] if args.classifier_col else [])]))
    if args.classifier_col:
        check_condition_column(adata, str(path), args.classifier_col)
    check_counts(adata, str(path))
    labelled = adata.obs[columns].notna().all(axis=1).to_numpy()
    if not labelled.all():
        print(f"note: {int((~labelled).sum())} cells without a label in {columns} are left out")
    obs = adata.obs.loc[labelled, keep].astype(str).astype("category")
    X = adata.X if labelled.all() else adata.X[np.flatnonzero(labelled)]
    X = sp.csr_matrix(X, dtype=np.float32)
    cells = ad.AnnData(X=X, obs=obs.reset_index(drop=True), var=adata.var[[]].copy())
    cells.obs_names = adata.obs_names[labelled].astype(str)
    if args.classifier_col and args.classifier_col not in columns:
        _classifier_by_group(cells.obs, columns, args.classifier_col, str(path))
    return Cells(cells, str(path), columns, args.classifier_col)


def _classifier_by_group(obs: pd.DataFrame, columns: list[str], col: str, source: str = ""):
    """group -> its classifier labels; refused (before any training) when a group has several,
    since generated cells only carry their group."""
    groups = group_labels(obs, columns)
    by_group = pd.Series(obs[col].astype(str).to_numpy()).groupby(groups).unique()
    mixed = [g for g, v in by_group.items() if len(v) > 1]
    if mixed:
        raise DataValidationError(
            source, f"obs['{col}']",
            f"--classifier-col varies within condition group {mixed[0]!r}, so generated cells "
            "have no label for it", "pass a classifier column that is one of --condition-col",
        )  # fmt: skip
    return by_group


def _synthesize(args: argparse.Namespace, out: Path) -> Path:
    """Cells with 3 cell types x (4 perturbations + controls) and cell-type-specific responses."""
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    path = out / "synthetic.h5ad"
    if not path.exists():
        config = SynthConfig(
            n_cells=args.synthetic_cells, n_genes=1000, n_perturbations=4, n_cell_types=3,
            n_batches=2, pert_type_scale=0.3, control_fraction=0.2, seed=0,
        )  # fmt: skip
        synthesize(config, path)
    return path


def split_held_out(cells: Cells, fraction: float, out: Path) -> HeldOutSplit:
    """A seeded, stratified share of every group is held out; each group keeps >= 1 training
    cell. The training cells become the store the models train on."""
    from latentcell.data_pipelines.build import build_store

    groups = cells.groups
    held = np.zeros(len(groups), dtype=bool)
    rng = np.random.default_rng(0)
    for group in sorted(set(groups)):
        rows = np.flatnonzero(groups == group)
        n_held = min(round(fraction * len(rows)), len(rows) - 1)
        held[rng.permutation(rows)[:n_held]] = True
    train, heldout = cells.adata[~held].copy(), cells.adata[held].copy()
    store = out / "train.zarr"
    if not store.exists():
        h5ad = out / "train_cells.h5ad"
        train.write_h5ad(h5ad)
        # no roles but a cell type named as such (the builder refuses a shadowed role name)
        cell_type = "cell_type" if "cell_type" in train.obs else None
        build_store([h5ad], store, schema="generic", cell_type_col=cell_type)
        h5ad.unlink()
    return HeldOutSplit(cells, train, heldout, store)


def _stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """``--set vae.model.n_latent=16`` -> ``model.n_latent=16`` for the VAE stage."""
    picked = []
    for text in overrides:
        head, _, rest = text.partition(".")
        if head not in ("vae", "dit") or not rest:
            raise DataValidationError(
                "--set", text, "must start with vae. or dit.", "e.g. --set dit.model.depth=4"
            )
        if head == stage:
            picked.append(rest)
    return picked


def train_models(
    args: argparse.Namespace, split: HeldOutSplit, folder: Path, seed: int
) -> TrainedModels:
    """The VAE, then the DiT on its latents, with the trainer's defaults (step budgets,
    folders and ``--set`` overrides aside)."""
    from latentcell.inference.generate import CellGenerator
    from latentcell.trainer.config import load_config
    from latentcell.trainer.dit_stage import DiTRunConfig, DiTStage
    from latentcell.trainer.loop import fit
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    root = folder.parent
    common = [
        f"data.path={split.store}", f"run.root={root}", "train.progress=false",
        f"train.seed={seed}", "train.checkpoint_every=0",
        # both stages validate on the same cells, stratified by the condition groups
        f"data.stratify={','.join(split.cells.columns)}",
    ]  # fmt: skip
    vae_dir, dit_dir = folder / "vae", folder / "dit"
    vae = load_config(VAERunConfig, None, [
        *common, *GENERATION_VAE, f"run.dir={vae_dir}", f"train.max_steps={args.vae_steps}",
        *_stage_overrides(args.overrides, "vae"),
    ])  # fmt: skip
    if not (args.reuse and (vae_dir / "final" / "model_config.json").exists()):
        fit(VAEStage(vae), vae)
    dit = load_config(DiTRunConfig, None, [
        *common, f"run.dir={dit_dir}", f"vae.run={vae_dir}", f"train.max_steps={args.dit_steps}",
        f"model.conditions={','.join(split.cells.columns)}",
        *_stage_overrides(args.overrides, "dit"),
    ])  # fmt: skip
    if not (args.reuse and (dit_dir / "final" / "model_config.json").exists()):
        fit(DiTStage(dit), dit)
    generator = CellGenerator.load(dit_dir)
    train_latents, held_latents = _encode(generator, split.train), _encode(generator, split.held)
    return TrainedModels(dit_dir, generator, train_latents, held_latents)


def _group_sizes(held: ad.AnnData, columns: list[str]) -> dict[str, tuple[dict, int]]:
    """group label -> ({column: value}, held-out cells)."""
    labels = group_labels(held.obs, columns)
    sizes = {}
    for label in sorted(set(labels)):
        first = np.flatnonzero(labels == label)[0]
        values = {c: str(held.obs[c].iloc[first]) for c in columns}
        sizes[label] = (values, int((labels == label).sum()))
    return sizes


def generate_groups(generator, sizes: dict, seed: int, source: str, args) -> ad.AnnData:
    """Cells for every held-out group: as many as it has held-out cells, within
    [MIN_CELLS_PER_GROUP, MAX_CELLS_PER_GROUP] (the evaluator subsamples to equal sizes)."""
    from latentcell.benchmarks.generation import MAX_CELLS_PER_GROUP, MIN_CELLS_PER_GROUP

    parts = []
    for values, n_held in sizes.values():
        n = int(np.clip(n_held, MIN_CELLS_PER_GROUP, MAX_CELLS_PER_GROUP))
        parts.append(generator.generate(n, values, args.steps, args.guidance, seed, source))
    return ad.concat(
        parts, merge="first", uns_merge="first", keys=[str(i) for i in range(len(parts))],
        index_unique="-",
    )  # fmt: skip


def _with_classifier_labels(gen: ad.AnnData, split: HeldOutSplit) -> ad.AnnData:
    """Generated cells get the classifier column when it is a function of their group."""
    col = split.cells.classifier_col
    if col is None or col in gen.obs:
        return gen
    columns = split.cells.columns
    by_group = _classifier_by_group(split.held.obs, columns, col)
    mapping = {g: v[0] for g, v in by_group.items()}
    gen.obs[col] = pd.Categorical([mapping[g] for g in group_labels(gen.obs, columns)])
    return gen


def evaluate_seed(args, split: HeldOutSplit, trained: TrainedModels, train_seed: int, seed: int):
    """One sampling seed of one trained DiT, judged by ``evaluate_generation``."""
    from latentcell.evaluation.generation import evaluate_generation
    from latentcell.inference.generate import write_h5ad_atomic

    generator = trained.generator
    sizes = _group_sizes(split.held, split.cells.columns)
    gen = _with_classifier_labels(generate_groups(generator, sizes, seed, "dit", args), split)
    prior = _with_classifier_labels(
        generate_groups(generator, sizes, seed, "vae_prior", args), split
    )
    folder = trained.dit_dir.parent / f"eval_seed{seed}"
    write_h5ad_atomic(gen, folder.parent / f"generated_seed{seed}.h5ad")
    extra = {"classifier_col": split.cells.classifier_col} if split.cells.classifier_col else {}
    summary = evaluate_generation(
        gen, split.held, ",".join(split.cells.columns), train=split.train,
        baselines={"vae_prior": prior}, out_dir=folder, **extra,
    )  # fmt: skip
    memorization = latent_memorization(trained, split, gen, summary["conditions"])
    return {
        "train_seed": train_seed, "sampling_seed": seed, "summary": summary,
        "memorization": memorization, "eval_dir": str(folder),
    }  # fmt: skip


def latent_memorization(
    trained: TrainedModels, split: HeldOutSplit, gen: ad.AnnData, conditions
) -> dict:
    """``latent_nn_ratio`` per evaluated group of the DiT's latents and, as its ceiling, of the
    held-out real cells' VAE latents, both against the DiT's training latents."""
    from latentcell.evaluation.metrics import latent_nn_ratio

    columns = split.cells.columns
    train_latents, held_latents = trained.train_latents, trained.held_latents
    train_groups, held_groups = (
        group_labels(split.train.obs, columns),
        group_labels(split.held.obs, columns),
    )
    gen_groups = group_labels(gen.obs, columns)
    out = {"generated": {}, "held_out_real": {}}
    for cond in conditions:
        ref = train_latents[train_groups == cond]
        if len(ref) < 3:
            continue
        out["generated"][cond] = latent_nn_ratio(ref, gen.obsm["X_latent"][gen_groups == cond])
        out["held_out_real"][cond] = latent_nn_ratio(ref, held_latents[held_groups == cond])
    return {k: float(np.mean(list(v.values()))) if v else float("nan") for k, v in out.items()}


def _encode(generator, adata: ad.AnnData) -> np.ndarray:
    """Posterior means of the DiT's VAE for these cells (the latents the DiT trains on)."""
    import torch

    from latentcell.data_pipelines.batches import csr_to_torch

    X = sp.csr_matrix(adata.X, dtype=np.float32)
    vae = generator.vae
    out = []
    with torch.no_grad():
        for a in range(0, X.shape[0], 4096):
            part = X[a : a + 4096]
            library = torch.from_numpy(np.asarray(part.sum(axis=1)).ravel().astype(np.float32))
            out.append(vae.encode(csr_to_torch(part), library)[0].numpy())
    return np.concatenate(out)
