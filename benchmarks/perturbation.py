"""The perturbation leaderboard: every family and baseline under one split, one evaluator,
one table.

    latentcell benchmark perturbation --data STORE --split SPLIT.toml
        [--models st,cvae,latent-shift] [--baselines all|none|mean,linear] [--seeds 3]
        [--cells-per-perturbation 500] [--set FAMILY:KEY=VALUE ...] [--reuse] --out DIR

Without ``--data``: the synthetic held-out cell type task (``perturbation_task``). Each
family (``families.registry``; ``--models``) is trained on the split's training cells once per
seed (``train.seed``; a family's ``variants`` too, e.g. ``latent-delta-absolute``), predicts
the test perturbations from the task's control cells (every mode of a family with several,
e.g. ``cvae-b`` and ``cvae-a``), and is evaluated like every
other entry; each baseline is fitted on the same training cells and evaluated with the same
seeds (the seed draws the control cells a prediction starts from). The table adds cell-eval's
training-mean baseline and its real-vs-real ceiling. Writes ``leaderboard.json``,
``leaderboard.md`` and ``figures/leaderboard.png`` into ``--out`` and one MLflow parent run
with a child run per entry, in the MLflow store of the training runs (``--tracking-uri``,
default ``--out/mlflow.db``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

from .perturbation_task import COMMAND, check_task_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a count store (data build --schema vcc); default: "
                        "the synthetic held-out cell type task")  # fmt: skip
    parser.add_argument("--split", help="split TOML (needed with --data)")
    parser.add_argument("--models", default=None,
                        help="comma-separated families (default: every perturbation family)")  # fmt: skip
    parser.add_argument("--baselines", default="all", help="all | none | comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--cells-per-perturbation", type=int, default=500)
    parser.add_argument("--cell-type", default=None, help="synthetic task: the held-out type")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FAMILY:KEY=VALUE",
                        help="override one family's config key, e.g. st:train.max_steps=500")  # fmt: skip
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs and evaluations in --out (same settings)")  # fmt: skip
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the training runs and the leaderboard's runs "
                        "(default: sqlite in --out)")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for runs and the leaderboard")


def _choices(args) -> tuple[list, list[str]]:
    """The families and baselines to run, checked before any work."""
    from latentcell.families import BASELINES, FAMILIES

    perturbation = [n for n, f in FAMILIES.items() if f.predicts_perturbations]
    names = [m.strip() for m in (args.models or ",".join(perturbation)).split(",") if m.strip()]
    unknown = [n for n in names if n not in perturbation]
    if unknown:
        raise DataValidationError(COMMAND, "--models", f"unknown or not a perturbation family: "
                                  f"{unknown}", f"use some of {perturbation}")  # fmt: skip
    if args.baselines == "all":
        baselines = list(BASELINES)
    elif args.baselines == "none":
        baselines = []
    else:
        baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if bad := [b for b in baselines if b not in BASELINES]:
        raise DataValidationError(COMMAND, "--baselines", f"unknown {bad}",
                                  f"use all, none or some of {list(BASELINES)}")  # fmt: skip
    if args.seeds < 1 or args.cells_per_perturbation < 1:
        raise DataValidationError(COMMAND, "--seeds/--cells-per-perturbation", "must be >= 1",
                                  "pass positive numbers")  # fmt: skip
    families = [FAMILIES[n] for n in names]
    check_task_flags(COMMAND, args, families, with_vae="latent" in baselines)
    return families, baselines


def run(args: argparse.Namespace) -> int:
    from .perturbation_entries import baseline_predictor, family_variants, latent_vae
    from .perturbation_report import figure, log_mlflow, markdown, verdict, write_board
    from .perturbation_task import open_task

    t0 = time.perf_counter()
    families, baselines = _choices(args)
    out = Path(args.out).absolute()
    task = open_task(out, args.data, args.split, args.cell_type)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    seeds = list(range(args.seeds))
    print(f"leaderboard: {task.description}; {len(task.perturbations)} test perturbations, "
          f"{task.real.n_obs} real cells; seeds {seeds}", flush=True)  # fmt: skip
    rows, runs = [], {}
    needs_vae = "latent" in baselines or any(f.vae for f in families)
    vae = None
    if needs_vae:
        vae = latent_vae(task, out, args.overrides, args.reuse, args.tracking_uri)
    for family in families:
        for label, overrides in family_variants(family, vae):
            rows += _family_rows(family, label, overrides, task, out, seeds, args, runs)
    for name in baselines:
        predictor = baseline_predictor(name, task, vae)
        rows.append(_entry(name, "baseline", lambda seed, p=predictor: p, task, out, seeds, args))
    rows += _reference_rows(rows)
    board = {
        "task": {"description": task.description, "store": str(task.store),
                 "split": str(task.split_file), "perturbations": list(task.perturbations),
                 "n_real": int(task.real.n_obs), "n_controls": int(task.controls.n_obs),
                 "n_train": int(task.train.n_obs)},
        "seeds": seeds, "cells_per_perturbation": args.cells_per_perturbation,
        "overrides": args.overrides, "rows": rows, "runs": runs,
    }  # fmt: skip
    board["verdict"] = verdict(rows)
    board["seconds"] = round(time.perf_counter() - t0, 1)
    write_board(out, board)
    fig = figure(board, out / "figures" / "leaderboard.png")
    board["mlflow_parent_run_id"] = log_mlflow(out, board, fig, args.tracking_uri)
    write_board(out, board)
    print(markdown(board))
    print(f"leaderboard in {out / 'leaderboard.md'} ({board['seconds']:.0f} s)")
    return 0


def _family_rows(family, label: str, overrides, task, out: Path, seeds: list[int], args,
                 runs: dict) -> list[dict]:  # fmt: skip
    """Train one run per seed of the family (or of one of its variants, ``label``, whose
    ``--set`` ``overrides`` come before the user's); one row per prediction mode."""
    from .perturbation_entries import family_predictor, train_entry

    user = [*overrides, *args.overrides]
    trained = {}
    for seed in seeds:
        run = out / "runs" / label / f"seed{seed}"
        t = time.perf_counter()
        summary = train_entry(family, task, run, seed, user, args.reuse, args.tracking_uri)
        print(f"trained {label} seed {seed} ({time.perf_counter() - t:.0f} s)", flush=True)
        trained[seed] = run
        runs.setdefault(label, {})[seed] = {"run_dir": str(run), **summary}
    modes = family.modes or (None,)
    rows = []
    for mode in modes:
        name = label if len(modes) == 1 else f"{label}-{mode}"
        rows.append(_entry(
            name, "family", lambda seed, m=mode: family_predictor(family, trained[seed], m),
            task, out, seeds, args,
        ))  # fmt: skip
    return rows


def _entry(name: str, kind: str, predictor_of_seed, task, out: Path, seeds, args) -> dict:
    from .perturbation_entries import predict_and_evaluate, reused_evaluation
    from .perturbation_report import aggregate, entry_metrics

    per_seed, summaries = [], []
    for seed in seeds:
        t = time.perf_counter()
        folder = out / "entries" / name / f"seed{seed}"
        result = (args.reuse and reused_evaluation(folder)) or predict_and_evaluate(
            predictor_of_seed(seed), task, folder, seed, args.cells_per_perturbation
        )
        if "refused" in result:
            print(f"{name}: refused: {result['refused']}", flush=True)
            return {"entry": name, "kind": kind, "refused": result["refused"]}
        per_seed.append(entry_metrics(result["summary"]))
        summaries.append(result["summary"])
        print(f"evaluated {name} seed {seed} ({time.perf_counter() - t:.0f} s): VCC score "
              f"{per_seed[-1].get('vcc_score')}", flush=True)  # fmt: skip
    return {"entry": name, "kind": kind, "table": aggregate(per_seed), "per_seed": per_seed,
            "eval_dir": str(out / "entries" / name / f"seed{seeds[0]}" / "eval"),
            "_summaries": summaries}  # fmt: skip


def _reference_rows(rows: list[dict]) -> list[dict]:
    """cell-eval's training-mean baseline and its ceiling, from the evaluations (the same
    real cells and training cells in every one)."""
    from .perturbation_report import CEILING, CELL_MEAN, aggregate, ceiling_metrics, entry_metrics

    summaries = [s for r in rows for s in r.pop("_summaries", [])]
    if not summaries:
        return []
    first = summaries[0]
    return [
        {"entry": CELL_MEAN, "kind": "reference", "table": aggregate([entry_metrics(first, "baseline")])},
        {"entry": CEILING, "kind": "reference", "table": aggregate([ceiling_metrics(first)])},
    ]  # fmt: skip
