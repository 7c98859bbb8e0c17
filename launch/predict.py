"""``latentcell predict``: perturbed populations from real control cells, written as h5ad.

    latentcell predict --run DIR --controls CTRL.h5ad --perturbations all|A,B
                       --cells-per-perturbation N --out PRED.h5ad
    latentcell predict --baseline mean|control|additive|linear [--target-effect] --train TRAIN.h5ad
                       --controls CTRL.h5ad --perturbations A,B ... --out PRED.h5ad

The file holds the real control cells and N predicted cells per perturbation (and cell type
of the controls), in the controls file's gene order: ready for ``latentcell evaluate
perturbation`` or ``cell-eval run``. ``all`` means every perturbation of the run (or of the
training file for a baseline), the control excluded.
"""

from __future__ import annotations

import argparse
import json
import time

from latentcell.data_pipelines.errors import DataValidationError


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict perturbed cells from controls (ST or baseline)")
    p.add_argument("--run", help="run.dir of `latentcell train st`")
    p.add_argument("--baseline", help="control | mean | additive | linear | latent (needs --train)")
    p.add_argument("--train", help="training cells (h5ad, counts) for --baseline")
    p.add_argument("--vae-run", help="count VAE run for --baseline latent (scGen arithmetic)")
    p.add_argument(
        "--basal", default="set", choices=("set", "train"),
        help="--baseline only: train re-centres the controls on the training controls' mean",
    )  # fmt: skip
    p.add_argument(
        "--target-effect", action="store_true",
        help="--baseline only: scale each perturbed gene's own expression by the factor its "
        "measured training targets show (the prior of the ST model's model.target_effect)",
    )  # fmt: skip
    p.add_argument("--controls", required=True, help="h5ad holding the control cells (counts)")
    p.add_argument("--perturbations", required=True, help="'all' or comma-separated labels")
    p.add_argument("--cells-per-perturbation", type=int, required=True)
    p.add_argument("--pert-col", default=None, help="perturbation column (default: the run's)")
    p.add_argument("--control-label", default=None, help="control label (default: the run's)")
    p.add_argument("--cell-type-col", default=None, help="cell type column (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "model"))
    p.add_argument(
        "--unseen", default="error", choices=("error", "generic"),
        help="--run only: a perturbation without a trained embedding is an error, or gets the "
        "generic vector the run learned (model.perturbation_dropout > 0)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.set_defaults(func=run_predict)


def _predictor(args, controls):
    """(predictor, its default perturbation column, control label, cell-type column, labels)."""
    if bool(args.run) == bool(args.baseline):
        raise DataValidationError(
            "latentcell predict", "--run/--baseline", "give exactly one", "pass --run DIR or --baseline NAME"
        )  # fmt: skip
    if args.run:
        from latentcell.trainer.st_predictor import STPredictor

        st = STPredictor(args.run, args.weights, args.unseen)
        roles, card = st.card["roles"], st.card
        labels = [x for x in st.labels if x != card["control_label"] and st.is_trained(x)]
        return st, roles["perturbation"], card["control_label"], roles.get("cell_type"), labels
    if not args.train:
        raise DataValidationError(
            "latentcell predict", "--train", "a baseline is fitted on training cells",
            "pass --train TRAIN.h5ad",
        )  # fmt: skip
    from latentcell.data_pipelines.read_h5ad import read_h5ad
    from latentcell.evaluation.perturbation_baselines import fit_baseline

    pert_col = args.pert_col or "target_gene"
    control = args.control_label or "non-targeting"
    cell_type_col = args.cell_type_col or "cell_type"
    train = read_h5ad(args.train, "--train")
    genes = [str(g) for g in controls.var_names]
    baseline = fit_baseline(
        args.baseline, train, genes, pert_col, control, cell_type_col, source=args.train,
        vae_run=args.vae_run, basal=args.basal, target_effect=args.target_effect,
    )  # fmt: skip
    labels = sorted(set(train.obs[pert_col].astype(str)) - {control})
    return baseline, pert_col, control, cell_type_col, labels


def run_predict(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.read_h5ad import read_h5ad
    from latentcell.trainer.generate import write_h5ad_atomic
    from latentcell.trainer.predict import PopulationRequest, predict_population

    start = time.perf_counter()
    controls = read_h5ad(args.controls, "--controls")
    predictor, pert_col, control, cell_type_col, labels = _predictor(args, controls)
    wanted = labels if args.perturbations == "all" else args.perturbations.split(",")
    request = PopulationRequest(
        perturbations=tuple(p.strip() for p in wanted if p.strip()),
        cells_per_perturbation=args.cells_per_perturbation,
        pert_col=args.pert_col or pert_col,
        control_label=args.control_label or control,
        cell_type_col=args.cell_type_col or cell_type_col,
        seed=args.seed,
    )
    pred = predict_population(predictor, controls, request, args.controls)
    write_h5ad_atomic(pred, args.out)
    summary = {
        "out": args.out, "predictor": predictor.name, "n_cells": pred.n_obs,
        "n_perturbations": len(request.perturbations),
        "seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip
    print(json.dumps(summary))
    return 0
