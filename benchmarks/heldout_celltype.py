"""Held-out cell types: predict a cell type's perturbed cells from its controls alone.

    latentcell benchmark heldout-celltype --out DIR [--data FILE.h5ad|STORE]
        [--cell-types A,B] [--st-steps N] [--vae-steps N] [--cells-per-perturbation N]

For each cell type T in turn (the CPA / scGen task): every perturbed cell of T is held out,
T's controls stay in training (``[[split.perturbations]] cell_types = [T]``, the same split
file for every method), and each method predicts T's perturbed populations from T's control
cells:

- ``st``: the ST set model (``model.basal=train``, ``model.cell_type_dropout``,
  ``model.shift_path``: without it the mean effects were not learned here), which meets T
  through its learned unknown cell type (``--unseen-cell-type unknown``): T had no
  perturbed training sets;
- the baselines (``evaluation/perturbation_baselines.py``, fitted on the split's training
  cells): control identity, training mean, additive, linear, and scGen's latent arithmetic on
  a count VAE trained on the same training cells (``split.file``);
- ``real_half``: the real-vs-real ceiling, half of T's real cells of each perturbation
  against the other half, which is also the reference every method is compared with.

Metrics (``evaluation/population_metrics.py``, per perturbation, then averaged): pearson_delta
on all genes and on the top-100 real DEGs, R^2 of gene means on those DEGs, and the energy
distance in PCA-50 fitted on real cells only (T's controls and perturbed cells). Without
``--data`` it synthesizes data with cell-type-specific responses (``data synth
--pert-type-scale``), so the true answer for T is neither "no response" nor the other types'
response. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METHODS = ("st", "control", "mean", "additive", "linear", "latent", "real_half")
METRICS = ("pearson_delta", "pearson_delta_top", "r2_means_top", "energy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for runs, results.json/.md")
    parser.add_argument(
        "--data", help="h5ad (built with --schema vcc) or a store; default: synthetic"
    )
    parser.add_argument(
        "--cell-types", help="comma-separated cell types to hold out (default: all)"
    )
    parser.add_argument("--st-steps", type=int, default=4000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--cells-per-perturbation", type=int, default=300)
    parser.add_argument("--top-genes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")


def run(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.split_files import open_count_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = _store(args, out)
    reader = open_count_store(store, "--data")
    meta = reader.meta
    types = _cell_types(args, meta, store)
    report = {"store": str(store), "settings": {k: v for k, v in vars(args).items() if k != "func"}}
    report["cell_types"] = {}
    for cell_type in types:
        start = time.perf_counter()
        result = held_out(cell_type, store, out / _slug(cell_type), args)
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["cell_types"][cell_type] = result
        print(f"held out {cell_type}: " + ", ".join(
            f"{m} {result['mean'][m]['energy']:.3g}" for m in METHODS
        ) + " (energy)", flush=True)  # fmt: skip
    report["mean"] = {
        m: {k: float(np.nanmean([r["mean"][m][k] for r in report["cell_types"].values()]))
            for k in METRICS}
        for m in METHODS
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _store(args, out: Path) -> Path:
    """The store to hold cell types out of: ``--data`` (a store, or an h5ad built here), or
    a synthetic data set with cell-type-specific responses."""
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    if args.data and (Path(args.data) / "manifest.json").exists():
        return Path(args.data)
    store = out / "store.zarr"
    if store.exists():
        return store
    h5ad = Path(args.data) if args.data else out / "synthetic.h5ad"
    if not args.data:
        synthesize(SynthConfig(
            n_cells=12_000, n_genes=500, n_perturbations=8, n_cell_types=4, n_batches=2,
            seed=args.seed, pert_type_scale=0.5, pert_shift_scale=0.8,
        ), h5ad)  # fmt: skip
    build_store([h5ad], store, schema="vcc", chunk_cells=500)
    return store


def _cell_types(args, meta, store) -> list[str]:
    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.data_pipelines.schemas import IMPLICIT_LABEL

    column = meta.roles.get("cell_type")
    known = [c for c in meta.categories.get(column, []) if c != IMPLICIT_LABEL] if column else []
    if len(known) < 2:
        raise DataValidationError(
            store, "cell_type", f"{len(known)} cell type(s): nothing to hold out",
            "use data with several cell types; for held-out perturbations on one cell type "
            "run latentcell benchmark papalexi2021 (zero_shot split)",
        )  # fmt: skip
    wanted = [c.strip() for c in args.cell_types.split(",")] if args.cell_types else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise DataValidationError(
            store, "--cell-types", f"unknown {unknown}", f"use some of {known}"
        )
    return wanted


def _slug(name: str) -> str:
    return "heldout_" + "".join(c if c.isalnum() else "_" for c in name)


def held_out(cell_type: str, store: Path, out: Path, args) -> dict:
    """Train on everything but ``cell_type``'s perturbed cells; score every method on them."""
    from latentcell.data_pipelines.perturbation_splits import assign_split, load_split_config
    from latentcell.data_pipelines.split_files import open_count_store, read_cells

    out.mkdir(parents=True, exist_ok=True)
    reader = open_count_store(store)
    meta = reader.meta
    pert_col, control = meta.roles["perturbation"], meta.control_label
    type_col = meta.roles["cell_type"]
    perts = [p for p in meta.categories[pert_col] if p != control]
    split_file = out / "split.toml"
    split_file.write_text(
        f"[split]\nseed = {args.seed}\n[[split.perturbations]]\ntest = {json.dumps(perts)}\n"
        f"cell_types = {json.dumps([cell_type])}\n"
    )
    split = assign_split(reader, load_split_config(split_file))
    train = read_cells(reader, split.train)
    test = read_cells(reader, split.test)
    in_type = (train.obs[type_col].astype(str) == cell_type).to_numpy()
    is_control = (train.obs[pert_col].astype(str) == control).to_numpy()
    controls = train[in_type & is_control].copy()  # T's controls: trained on, predicted from
    vae = _train("vae", store, split_file, out, args)
    st = _train("st", store, split_file, out, args)
    predictors = _predictors(st, vae, train, meta, controls, args)
    return _score(predictors, controls, test, perts, pert_col, control, type_col, args)


def _train(stage: str, store: Path, split_file: Path, out: Path, args) -> Path:
    from latentcell.families import family_named
    from latentcell.families.train import load_family_config, train_family

    run = out / stage
    if args.reuse and (run / "final" / "model_config.json").exists():
        return run
    common = [f"data.path={store}", f"split.file={split_file}", f"run.dir={run}",
              f"run.root={out.parent}", "train.progress=false", "train.checkpoint_every=0",
              "train.eval_every=0", f"train.seed={args.seed}"]  # fmt: skip
    settings = {
        "vae": ["model.batch_conditioning=false", "model.n_latent=16", "model.n_hidden=128",
                f"train.max_steps={args.vae_steps}", "data.batch_size=256"],
        "st": ["data.set_size=32", "data.sets_per_batch=8", "model.hidden=128", "model.depth=2",
               "model.heads=4", "model.basal=train", "model.cell_type_dropout=0.2",
               "model.shift_path=true",
               f"train.max_steps={args.st_steps}", "train.ema=true", "train.ema_decay=0.995",
               "optim.lr=1e-3", "optim.warmup_steps=100"],
    }  # fmt: skip
    family = family_named(stage)
    train_family(family, load_family_config(family, None, common + settings[stage]))
    _reset_accelerate()
    return run


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _predictors(st: Path, vae: Path, train, meta, controls, args) -> dict:
    from latentcell.evaluation.perturbation_baselines import fit_baseline
    from latentcell.inference.st_predictor import STPredictor

    genes = [str(g) for g in controls.var_names]
    roles = meta.roles
    out = {"st": STPredictor(st, unseen_cell_type="unknown")}
    for name in METHODS[1:-1]:
        out[name] = fit_baseline(
            name, train, genes, roles["perturbation"], meta.control_label, roles["cell_type"],
            source="training cells", vae_run=str(vae) if name == "latent" else None,
            basal="train", batch_col=roles.get("batch"),
        )  # fmt: skip
    return out


def _score(predictors, controls, test, perts, pert_col, control, type_col, args) -> dict:
    """Per perturbation: each method's predicted cells vs one half of the real cells; the
    other half is the real-vs-real ceiling."""
    from latentcell.evaluation.population_metrics import energy_in_pca, shift_metrics
    from latentcell.inference.predict import PopulationRequest, predict_population

    ctrl = _log1p(controls)
    real_all = _log1p(test)
    labels = test.obs[pert_col].astype(str).to_numpy()
    request = PopulationRequest(tuple(perts), args.cells_per_perturbation, pert_col, control,
                                type_col, seed=args.seed)  # fmt: skip
    predicted = {}
    for name, predictor in predictors.items():
        pred = predict_population(predictor, controls, request, "held-out controls")
        labels_pred = pred.obs[pert_col].astype(str).to_numpy()
        is_pred = labels_pred != control  # the file starts with the real controls
        predicted[name] = (_log1p(pred[is_pred]), labels_pred[is_pred])
    rng = np.random.default_rng(args.seed)
    per_pert = {}
    for p in perts:
        rows = rng.permutation(np.flatnonzero(labels == p))
        if len(rows) < 4:
            continue
        half_a, half_b = real_all[rows[: len(rows) // 2]], real_all[rows[len(rows) // 2 :]]
        fit_on = np.concatenate([ctrl, real_all[rows]])
        scores = {}
        cells = {name: x[lab == p] for name, (x, lab) in predicted.items()}
        cells["real_half"] = half_a
        for name, x in cells.items():
            scores[name] = {
                **shift_metrics(x, half_b, ctrl, args.top_genes),
                "energy": energy_in_pca(x, half_b, fit_on),
            }
        per_pert[p] = scores
    mean = {m: {k: float(np.nanmean([s[m][k] for s in per_pert.values()])) for k in METRICS}
            for m in METHODS}  # fmt: skip
    return {"n_controls": int(controls.n_obs), "n_real": int(test.n_obs),
            "per_perturbation": per_pert, "mean": mean}  # fmt: skip


def _log1p(adata) -> np.ndarray:
    from latentcell.inference.predict import log1p_normalize

    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = np.asarray(x, dtype=np.float64)
    return log1p_normalize(x, x.sum(1))


def markdown(report: dict) -> str:
    """One table per metric: held-out cell types as columns, their mean last."""
    types = list(report["cell_types"])
    lines = []
    names = {"pearson_delta": "pearson_delta, all genes (higher is better)",
             "pearson_delta_top": "pearson_delta, top-100 real DEGs (higher is better)",
             "r2_means_top": "R^2 of gene means, top-100 real DEGs (higher is better)",
             "energy": "energy distance, PCA-50 of real cells (lower is better)"}  # fmt: skip
    for metric in METRICS:
        lines += [f"**{names[metric]}**", "", "| method | " + " | ".join(types) + " | mean |",
                  "|---|" + "---|" * (len(types) + 1)]  # fmt: skip
        for m in METHODS:
            cells = [report["cell_types"][t]["mean"][m][metric] for t in types]
            cells.append(report["mean"][m][metric])
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)
