"""``latentcell predict``: perturbed populations from real control cells, written as h5ad.

    latentcell predict --run DIR --controls CTRL.h5ad --perturbations all|A,B
                       --cells-per-perturbation N [--mode M] [--steps N] [--guidance W]
                       --out PRED.h5ad
    latentcell predict --baseline mean|control|additive|linear [--target-effect] --train TRAIN.h5ad
                       --controls CTRL.h5ad --perturbations A,B ... --out PRED.h5ad
    latentcell predict --baseline mean --split SPLIT.toml --store STORE --controls CTRL.h5ad ...
    latentcell predict --run MULTIOMICS_RUN --cells CELLS.h5ad --to protein|rna --out OUT.h5ad

The file holds the real control cells and N predicted cells per perturbation (and cell type
of the controls), in the controls file's gene order: ready for ``latentcell evaluate
perturbation`` or ``cell-eval run``. ``all`` means every perturbation of the run (or of the
training file for a baseline), the control excluded.

A baseline is fitted on training cells: ``--split SPLIT.toml --store STORE`` takes the split's
train rows from the store (the rows ``train st`` trains on with that ``split.file``; no
training file to cut by hand), ``--train`` a file (e.g. ``train.h5ad`` of ``latentcell data
split``). Column options default to the run's roles (``--run``), the store's (``--split``), or
those ``data split`` recorded in the training file, before the VCC names.

With ``--to``, a run of a translating family (multiomics) translates cells measured in one
modality into the other instead (``launch/translate.py``).
"""

from __future__ import annotations

import argparse
import sys
import time

from latentcell.data_pipelines.errors import DataValidationError


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    from latentcell.families import BASELINES, FAMILIES

    families = [name for name, f in FAMILIES.items() if f.predicts_perturbations]
    translating = [name for name, f in FAMILIES.items() if f.translator]
    p = sub.add_parser(
        "predict", help="predict perturbed cells from controls (a trained run or a baseline), "
        "or translate cells between modalities (--to)",
        description="Predict perturbed cells from control cells, with a finished run of a "
        f"perturbation family ({', '.join(families)}) or a baseline fitted on training cells "
        f"({', '.join(BASELINES)}). With --cells and --to, translate cells measured in one "
        f"modality into the other with a run of {', '.join(translating)}.",
    )  # fmt: skip
    p.add_argument("--run", help="run.dir of `latentcell train FAMILY` "
                   f"({', '.join(families + translating)})")  # fmt: skip
    p.add_argument(
        "--mode", default=None,
        help="--run only: the family's prediction mode ("
        + "; ".join(f"{n}: {'|'.join(FAMILIES[n].modes)}" for n in families if FAMILIES[n].modes)
        + "; default: the first)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="--mode sampled only: sampler steps (default: the run's)")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None,
                   help="--mode sampled only: classifier-free guidance on the perturbation "
                   "(1 = none; default: the run's)")  # fmt: skip
    p.add_argument(
        "--baseline",
        help=f"{' | '.join(BASELINES)} (needs --split and --store, or --train)",
    )
    p.add_argument("--train", help="training cells (h5ad, counts) for --baseline")
    p.add_argument(
        "--split", help="--baseline only: fit on this split TOML's train rows of --store (the "
        "split.file of train st), instead of --train",
    )  # fmt: skip
    p.add_argument("--store", help="the count store --split is assigned on")
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
    p.add_argument("--controls", help="h5ad holding the control cells (counts; required to "
                   "predict perturbations)")  # fmt: skip
    p.add_argument("--perturbations", help="'all' or comma-separated labels (required to "
                   "predict perturbations)")  # fmt: skip
    p.add_argument("--cells-per-perturbation", type=int, help="predicted cells per "
                   "perturbation and cell type (required to predict perturbations)")  # fmt: skip
    p.add_argument("--to", choices=("protein", "rna"), default=None,
                   help=f"translate --cells into this modality with a --run of "
                   f"{', '.join(translating)} (instead of predicting perturbations)")  # fmt: skip
    p.add_argument("--cells", default=None, help="--to only: h5ad of the cells to translate "
                   "(RNA counts in X for --to protein; protein counts in obsm for --to rna)")  # fmt: skip
    p.add_argument("--protein-key", default=None, help="--to only: the obsm key of the "
                   "protein counts (default: the run's, e.g. protein_counts)")  # fmt: skip
    defaults = "(default: the run's, the store's, or those `data split` recorded in --train)"
    p.add_argument("--pert-col", default=None, help=f"perturbation column {defaults}")
    p.add_argument("--control-label", default=None, help=f"control label {defaults}")
    p.add_argument("--cell-type-col", default=None, help=f"cell type column {defaults}")
    p.add_argument(
        "--batch-col", default=None,
        help="--baseline only: batch column the shifts are matched within (default: the "
        "store's batch role with --split, else 'batch' where the training file has it)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "model"))
    p.add_argument(
        "--unseen", default="error", choices=("error", "generic"),
        help="--run only: a perturbation without a trained embedding is an error, or gets the "
        "generic vector the run learned (model.perturbation_dropout > 0)",
    )  # fmt: skip
    p.add_argument(
        "--unseen-cell-type", default="error", choices=("error", "unknown"),
        help="--run only: a cell type without training sets is an error, or gets the unknown "
        "cell type the run learned (model.cell_type_dropout > 0)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")
    p.set_defaults(func=run_predict)


def _predictor(args, controls):
    """(predictor, its default perturbation column, control label, cell-type column, labels)."""
    if bool(args.run) == bool(args.baseline):
        raise DataValidationError(
            "latentcell predict", "--run/--baseline", "give exactly one", "pass --run DIR or --baseline NAME"
        )  # fmt: skip
    if args.run and (args.split or args.store):
        raise DataValidationError(
            args.run, "--split/--store", "a run was trained on its own split (split.npz)",
            "drop --split and --store (they choose a baseline's training cells)",
        )  # fmt: skip
    if args.run:
        predictor = load_run_predictor(args)
        labels = predictor.run_labels
        return (
            predictor, labels.pert_col, labels.control_label, labels.cell_type_col,
            list(labels.perturbations),
        )  # fmt: skip
    for flag, value in (("--mode", args.mode), ("--steps", args.steps),
                        ("--guidance", args.guidance)):  # fmt: skip
        if value is not None:
            raise DataValidationError(
                "latentcell predict", flag, "a prediction mode belongs to a trained run",
                f"drop {flag}, or pass --run DIR",
            )  # fmt: skip
    from latentcell.evaluation.perturbation_baselines import fit_baseline

    train, source, roles = _training_cells(args)
    pert_col = args.pert_col or roles[0]
    control = args.control_label or roles[1]
    cell_type_col = args.cell_type_col or roles[2]
    batch_col = args.batch_col or roles[3]  # shifts are matched within (cell type, batch)
    genes = [str(g) for g in controls.var_names]
    baseline = fit_baseline(
        args.baseline, train, genes, pert_col, control, cell_type_col, source=source,
        vae_run=args.vae_run, basal=args.basal, target_effect=args.target_effect,
        batch_col=batch_col,
    )  # fmt: skip
    labels = sorted(set(train.obs[pert_col].astype(str)) - {control})
    return baseline, pert_col, control, cell_type_col, labels


def load_run_predictor(args):
    """The predictor of ``--run``'s family (``families.registry``), in ``--mode``."""
    from latentcell.families import FAMILIES, family_of_run
    from latentcell.inference.predict import PredictOptions

    family = family_of_run(args.run)
    if family.translator is not None:
        raise DataValidationError(
            args.run, "class", f"a {family.name} run translates between modalities, it does "
            "not predict perturbations", "pass --cells IN.h5ad --to protein|rna --out OUT.h5ad "
            "(without --controls, --perturbations, --cells-per-perturbation)",
        )  # fmt: skip
    if not family.predicts_perturbations:
        raise DataValidationError(
            args.run, "class", f"a {family.name} run does not predict perturbations",
            "pass a run of a perturbation family: latentcell train st|cvae|latent-shift|latent-delta|masked-diffusion",
        )  # fmt: skip
    if args.mode is not None and args.mode not in family.modes:
        choices = "|".join(family.modes) if family.modes else "no --mode"
        raise DataValidationError(
            args.run, "--mode", f"the {family.name} family has no mode {args.mode!r}",
            f"use {choices}",
        )  # fmt: skip
    sampling = [
        f for f, v in (("--steps", args.steps), ("--guidance", args.guidance)) if v is not None
    ]
    if sampling and not family.sampling:
        samplers = "|".join(f.name for f in FAMILIES.values() if f.sampling)
        raise DataValidationError(
            args.run, "/".join(sampling), f"the {family.name} family has no iterative sampler",
            f"drop them (they are for runs of {samplers})",
        )  # fmt: skip
    options = PredictOptions(
        args.weights, args.unseen, args.unseen_cell_type, args.mode, args.steps, args.guidance
    )
    return family.load("predictor")(args.run, options)


def _require_population_flags(args: argparse.Namespace) -> None:
    """The flags perturbation prediction needs (argparse does not require them: translation,
    ``--to``, goes without them)."""
    from latentcell.launch.translate import refuse_translation_flags

    refuse_translation_flags(args)
    for flag, value in (("--controls", args.controls), ("--perturbations", args.perturbations),
                        ("--cells-per-perturbation", args.cells_per_perturbation)):  # fmt: skip
        if value is None:
            raise DataValidationError(
                "latentcell predict", flag, "required to predict perturbations",
                f"pass {flag} (or --to protein|rna --cells IN.h5ad to translate with a "
                "multiomics run)",
            )  # fmt: skip


def run_predict(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.read_h5ad import read_h5ad
    from latentcell.inference.generate import write_h5ad_atomic
    from latentcell.inference.predict import PopulationRequest, predict_population

    if args.to is not None:
        from latentcell.launch.translate import run_translate

        return run_translate(args)
    _require_population_flags(args)
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
    from latentcell.evaluation.perturbation_baselines import coincidence_note

    if note := coincidence_note(predictor, pred, request):  # e.g. mean == additive
        print(note, file=sys.stderr if args.json else sys.stdout)
    write_h5ad_atomic(pred, args.out)
    summary = {
        "out": args.out, "predictor": predictor.name, "n_cells": pred.n_obs,
        "n_perturbations": len(request.perturbations),
        "seconds": round(time.perf_counter() - start, 2),
        "fallbacks": pred.uns["latentcell"].get("fallbacks", {}),
    }  # fmt: skip
    from latentcell.launch.next_steps import after_predict, finish

    finish(summary, after_predict(summary), args.json)
    return 0


# Column defaults of a baseline's training file that says nothing about its columns (an h5ad
# not written by `latentcell data split`): the VCC schema's.
LEGACY_ROLES = ("target_gene", "non-targeting", "cell_type", "batch")


def _training_cells(args) -> tuple:
    """A baseline's training cells: (AnnData, the source named in errors, the default
    (perturbation column, control label, cell-type column, batch column)).

    ``--split S.toml --store STORE``: the split's train rows of the store, assigned as
    ``train st`` assigns them (the same function and file), with the store's roles as the
    column defaults. ``--train F.h5ad``: the file, with the roles recorded by ``latentcell data
    split`` (``.uns['latentcell_split']``) as defaults where it has them."""
    from latentcell.data_pipelines.split_files import UNS_KEY

    if args.split and args.train:
        raise DataValidationError(
            "latentcell predict", "--train/--split", "both give the training cells",
            "pass --split SPLIT.toml --store STORE, or --train TRAIN.h5ad",
        )  # fmt: skip
    if args.store and not args.split:
        raise DataValidationError(
            args.store, "--store", "a store is only read with --split",
            "add --split SPLIT.toml (its train rows fit the baseline), or drop --store",
        )  # fmt: skip
    if args.split:
        return _split_training_cells(args.split, args.store)
    if not args.train:
        raise DataValidationError(
            "latentcell predict", "--train", "a baseline is fitted on training cells",
            "pass --split SPLIT.toml --store STORE (the split's train rows), or --train "
            "TRAIN.h5ad",
        )  # fmt: skip
    from latentcell.data_pipelines.read_h5ad import read_h5ad

    train = read_h5ad(args.train, "--train")
    written = train.uns.get(UNS_KEY, {})
    roles = dict(written.get("roles", {}))
    defaults = (
        roles.get("perturbation", LEGACY_ROLES[0]),
        written.get("control_label", LEGACY_ROLES[1]),
        roles.get("cell_type", LEGACY_ROLES[2]),
        roles.get("batch", LEGACY_ROLES[3]),
    )
    return train, args.train, defaults


def _split_training_cells(split_file: str, store: str | None) -> tuple:
    """The train rows of ``split_file`` on ``store`` (see ``_training_cells``)."""
    from latentcell.data_pipelines.perturbation_splits import assign_split, load_split_config
    from latentcell.data_pipelines.split_files import open_count_store, read_cells

    config = load_split_config(split_file)  # a bad split file fails first
    if not store:
        raise DataValidationError(
            split_file, "--store", "the split is assigned on a store",
            "pass --store STORE (the store `latentcell train st` used with this split)",
        )  # fmt: skip
    reader = open_count_store(store)
    meta = reader.meta
    if meta.roles.get("perturbation") is None or meta.control_label is None:
        raise DataValidationError(
            store, "roles.perturbation", "the store has no perturbation column or control label",
            "build it with --schema vcc (or --pert-col / --control)",
        )  # fmt: skip
    train = read_cells(reader, assign_split(reader, config).train)
    roles = (
        meta.roles["perturbation"], meta.control_label, meta.roles.get("cell_type"),
        meta.roles.get("batch"),
    )  # fmt: skip
    return train, f"{split_file} (train rows of {store})", roles
