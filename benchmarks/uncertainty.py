"""Calibrated uncertainty of perturbation predictions: does a model predict the real spread of
cells, and does the spread of its predictions cover the real mean as often as it should?

    latentcell benchmark uncertainty --out DIR [--data STORE --split SPLIT.toml]
        [--models st,cvae] [--baselines none|control,mean,...] [--members 20] [--seed 0]
        [--set FAMILY:KEY=VALUE ...] [--reuse] [--runs-from DIR]

The task is the leaderboard's (``perturbation_task``; without ``--data`` the synthetic held-out
cell type task). Each family in ``--models`` (and each of its variants, e.g.
``latent-delta-absolute``) is trained once with ``--seed`` (or its finished run is taken from
``--runs-from DIR/runs/LABEL/seed<seed>``, e.g. a leaderboard's, with the leaderboard's count
VAE for the families that need one), one entry per prediction mode; baselines are fitted on
the training cells. For every test perturbation
and cell type with >= 10 real perturbed cells (n of them), each entry predicts ``--members``
populations of n cells, each from its own draw of the cell type's controls, written as
prediction files hold them (counts at the controls' library sizes, then log1p again), and
is scored by ``evaluation/uncertainty.py``: the variance R² of the first member and the
coverage and width of the 90% interval of the member means. Every entry sees the same control
draws.

``real_resample`` is the calibrated reference: the real cells split at random into halves A
and B; A is scored, members are resampled from B with replacement, each of nA nB / (nA + nB)
cells, so that a member mean differs from B's mean as much as A's mean does, and A's mean is
exchangeable with the members (covered at 0.9). Resampling the scored cells themselves would
centre every member on the real mean and cover it always (1.0 measured, 20 members). Its
width is scaled by sqrt(m / n) to what members of n cells would have, and its variance R² is
B's variances against A's. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark uncertainty"
LEVEL = 0.9
MIN_CELLS = 10  # real cells of a group; fewer give no useful mean or variance
REFERENCE = "real_resample"
METRICS = ("variance_r2", "coverage_90", "interval_width")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a count store (data build --schema vcc); default: "
                        "the synthetic held-out cell type task")  # fmt: skip
    parser.add_argument("--split", help="split TOML (needed with --data)")
    parser.add_argument("--models", default="st", help="comma-separated perturbation families")
    parser.add_argument("--baselines", default="control,mean",
                        help="none | comma-separated of control, mean, additive, linear "
                        "(not latent: it needs a count VAE; see benchmark perturbation)")  # fmt: skip
    parser.add_argument("--members", type=int, default=20,
                        help="predicted populations per group (>= 19 for a 90%% interval)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="training seed and control draws")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FAMILY:KEY=VALUE",
                        help="override one family's config key, e.g. st:train.max_steps=500")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--runs-from", default=None, metavar="DIR",
                        help="take finished runs from DIR/runs/FAMILY/seed<seed> (e.g. a "
                        "leaderboard's --out) instead of training them")  # fmt: skip
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the training runs (default: sqlite in --out)")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for runs, results.json/.md")


def _choices(args) -> tuple[list, list[str]]:
    """The families and baselines to run, checked before any work."""
    from latentcell.families import BASELINES, FAMILIES

    from .perturbation_task import check_task_flags

    perturbation = [n for n, f in FAMILIES.items() if f.predicts_perturbations]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in perturbation]
    if unknown:
        raise DataValidationError(COMMAND, "--models", f"unknown or not a perturbation family: "
                                  f"{unknown}", f"use some of {perturbation}")  # fmt: skip
    usable = [b for b in BASELINES if b != "latent"]
    baselines = [] if args.baselines == "none" else [
        b.strip() for b in args.baselines.split(",") if b.strip()
    ]  # fmt: skip
    if bad := [b for b in baselines if b not in usable]:
        raise DataValidationError(COMMAND, "--baselines", f"unknown or unsupported {bad}",
                                  f"use none or some of {usable} (latent needs a count VAE: "
                                  "run it in latentcell benchmark perturbation)")  # fmt: skip
    if args.members < 2 or args.seed < 0:
        raise DataValidationError(COMMAND, "--members/--seed", f"got {args.members}/{args.seed}",
                                  "pass --members >= 2 (20 for a 90% interval) and --seed >= 0")  # fmt: skip
    check_task_flags(COMMAND, args, [FAMILIES[n] for n in names])
    if args.runs_from and not Path(args.runs_from).is_dir():
        raise DataValidationError(args.runs_from, "--runs-from", "no such folder",
                                  "pass the --out folder of an earlier run")  # fmt: skip
    return [FAMILIES[n] for n in names], baselines


@dataclass(frozen=True)
class Group:
    """The real perturbed cells of one perturbation in one cell type (None: no column)."""

    perturbation: str
    cell_type: str | None
    real: np.ndarray  # log1p-normalized, cells x the task's genes


@dataclass(frozen=True)
class Controls:
    log1p: np.ndarray  # cells x the task's genes, normalized by the whole library
    library: np.ndarray


def run(args: argparse.Namespace) -> int:
    from latentcell.evaluation.uncertainty import calibrated_coverage

    from .perturbation_entries import baseline_predictor, family_variants
    from .perturbation_task import open_task

    t0 = time.perf_counter()
    families, baselines = _choices(args)
    out = Path(args.out).absolute()
    task = open_task(out, args.data, args.split)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    groups, skipped = _groups(task)
    controls = _controls(task)
    print(f"uncertainty: {task.description}; {len(groups)} groups of {len(task.perturbations)} "
          f"test perturbations ({len(skipped)} with < {MIN_CELLS} real cells or no controls "
          f"skipped); {args.members} members each", flush=True)  # fmt: skip
    entries, runs = [], {}
    vae = _vae(task, out, args) if any(f.vae for f in families) else None
    for family in families:
        for label, overrides in family_variants(family, vae):
            run_dir = _trained(family, label, overrides, task, out, args, runs)
            entries += _family_entries(family, label, run_dir, task, groups, controls, args)
    for name in baselines:
        load = partial(baseline_predictor, name, task, None)
        entries.append(_entry(name, "baseline", load, task, groups, controls, args))
    entries.append(_reference(groups, args))
    results = {
        "task": {"description": task.description, "store": str(task.store),
                 "split": str(task.split_file), "perturbations": list(task.perturbations),
                 "n_real": int(task.real.n_obs), "n_controls": int(task.controls.n_obs)},
        "settings": {"members": args.members, "seed": args.seed, "level": LEVEL,
                     "min_cells": MIN_CELLS, "quantile_method": "weibull",
                     "models": [f.name for f in families], "baselines": baselines,
                     "overrides": args.overrides, "runs_from": args.runs_from},
        "calibrated_coverage": calibrated_coverage(args.members, LEVEL),
        "n_groups": len(groups), "skipped": skipped, "runs": runs, "entries": entries,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    _write(out, results)
    print(markdown(results))
    print(f"results in {out / 'results.md'} ({results['seconds']:.0f} s)")
    return 0


def _groups(task) -> tuple[list[Group], list[dict]]:
    """Each (perturbation, cell type) of the real perturbed cells with >= MIN_CELLS cells and
    controls of its cell type; the others, listed with why."""
    from latentcell.inference.predict import _dense, log1p_normalize

    obs = task.real.obs
    labels = obs[task.pert_col].astype(str).to_numpy()
    types = obs[task.cell_type_col].astype(str).to_numpy() if task.cell_type_col else None
    control_types = set(_cell_types(task.controls, task))
    groups, skipped = [], []
    for perturbation in task.perturbations:
        rows = labels == perturbation
        for cell_type in sorted(set(types[rows])) if types is not None else [None]:
            cells = rows & (types == cell_type) if types is not None else rows
            n = int(cells.sum())
            if n < MIN_CELLS or cell_type not in control_types:
                why = f"< {MIN_CELLS} real cells" if n < MIN_CELLS else "no controls"
                skipped.append({"perturbation": perturbation, "cell_type": cell_type, "n_real": n,
                                "why": why})  # fmt: skip
                continue
            counts = _dense(task.real.X[np.flatnonzero(cells)])
            real = log1p_normalize(counts, counts.sum(axis=1))
            groups.append(Group(perturbation, cell_type, real))
    return groups, skipped


def _cell_types(adata, task) -> list:
    if task.cell_type_col is None:
        return [None] * adata.n_obs
    return list(adata.obs[task.cell_type_col].astype(str))


def _controls(task) -> dict:
    from latentcell.inference.predict import _dense, log1p_normalize

    counts = _dense(task.controls.X)
    library = counts.sum(axis=1)
    types = np.array(_cell_types(task.controls, task), dtype=object)
    by_type = {}
    for cell_type in set(types):
        rows = np.flatnonzero(types == cell_type)
        by_type[cell_type] = Controls(log1p_normalize(counts[rows], library[rows]), library[rows])
    return by_type


def _family_entries(family, label, run_dir, task, groups, controls, args) -> list[dict]:
    """One entry per prediction mode of a trained run (named like the leaderboard's rows)."""
    from .perturbation_entries import family_predictor

    modes = family.modes or (None,)
    entries = []
    for mode in modes:
        name = label if len(modes) == 1 else f"{label}-{mode}"
        load = partial(family_predictor, family, run_dir, mode)
        entries.append(_entry(name, "family", load, task, groups, controls, args))
    return entries


def _given(args, *parts: str) -> Path | None:
    """A finished run under ``--runs-from`` (e.g. a leaderboard's), or None."""
    if not args.runs_from:
        return None
    given = Path(args.runs_from).absolute().joinpath("runs", *parts)
    return given if (given / "final" / "model_config.json").exists() else None


def _vae(task, out: Path, args) -> Path:
    """The count VAE of the families working in its latent: --runs-from's, else trained."""
    from .perturbation_entries import VAE_RUN, latent_vae

    return _given(args, VAE_RUN) or latent_vae(task, out, args.overrides, args.reuse,
                                                args.tracking_uri)  # fmt: skip


def _trained(family, label: str, overrides, task, out: Path, args, runs: dict) -> Path:
    """The run of a family (or of its variant ``label``): a finished one under --runs-from,
    else trained (or reused) in --out."""
    from .perturbation_entries import train_entry

    run = out / "runs" / label / f"seed{args.seed}"
    reuse = args.reuse
    if given := _given(args, label, f"seed{args.seed}"):
        run, reuse = given, True
    t = time.perf_counter()
    user = [*overrides, *args.overrides]
    summary = train_entry(family, task, run, args.seed, user, reuse, args.tracking_uri)
    verb = "reused" if summary.get("reused") else "trained"
    print(f"{verb} {label} seed {args.seed}: {run} ({time.perf_counter() - t:.0f} s)",
          flush=True)  # fmt: skip
    runs[label] = {"run_dir": str(run), **summary}
    return run


def _key(*parts) -> list[int]:
    """A stable seed sequence entry per (perturbation, cell type, ...): hash() is salted."""
    return [zlib.crc32(str("" if p is None else p).encode()) for p in parts]


def _entry(name: str, kind: str, load, task, groups: list[Group], controls: dict, args) -> dict:
    """One predictor's scores over the groups; a predictor that refuses a perturbation or cell
    type (DataValidationError) is recorded with its one line, as in the leaderboard."""
    from latentcell.inference.gene_names import GeneNames
    from latentcell.inference.predict import PopulationRequest, _gene_columns, _missing_cell_type

    t = time.perf_counter()
    source = "the task's controls"
    try:
        predictor = load()
        columns = _gene_columns(task.controls, GeneNames.of(predictor), source)
        request = PopulationRequest(task.perturbations, 1, task.pert_col, task.control,
                                    task.cell_type_col, args.seed)  # fmt: skip
        routes, fallbacks, rows = getattr(predictor, "routes", None), {}, []
        for group in groups:
            cell_type = group.cell_type
            if cell_type is None:
                cell_type = _missing_cell_type(predictor, request, source)
            members = _members(predictor, group, cell_type, controls[group.cell_type], columns,
                               args)  # fmt: skip
            rows.append(_scored(group, members, group.real[:, columns]))
            taken = routes(group.perturbation, cell_type) if routes else {}
            for route_kind, route in taken.items():  # recorded as prediction files do
                label = group.perturbation if route_kind == "perturbation" else cell_type
                fallbacks.setdefault(route_kind, {})[label] = route
    except DataValidationError as err:
        print(f"{name}: refused: {err}", flush=True)
        return {"entry": name, "kind": kind, "refused": str(err)}
    return _summarized(name, kind, rows, time.perf_counter() - t, fallbacks)


def _members(predictor, group: Group, cell_type: str, ctrl: Controls, columns, args) -> list:
    """``--members`` predictions of the group's size, each from its own seeded control draw,
    through counts as a prediction file holds them."""
    from latentcell.inference.predict import log1p_normalize, to_counts

    n = group.real.shape[0]
    members = []
    for m in range(args.members):
        rng = np.random.default_rng([args.seed, *_key(group.perturbation, group.cell_type), m])
        draw = rng.choice(len(ctrl.library), size=n, replace=True)
        library = ctrl.library[draw]
        pred = predictor.predict(ctrl.log1p[draw][:, columns], group.perturbation, cell_type,
                                 library, rng)  # fmt: skip
        members.append(log1p_normalize(to_counts(pred, library, rng), library))
    return members


def _scored(group: Group, members, real, variance_of=None, width_scale: float = 1.0) -> dict:
    from latentcell.evaluation.uncertainty import score_group

    scores = score_group(members, real, LEVEL, variance_of=variance_of)
    scores["interval_width"] *= width_scale
    scores = {k: (v if math.isfinite(v) else None) for k, v in scores.items()}
    return {"perturbation": group.perturbation, "cell_type": group.cell_type,
            "n_real": int(group.real.shape[0]), **scores}  # fmt: skip


def _reference(groups: list[Group], args) -> dict:
    """``real_resample`` (module docstring): half A scored, members of nA nB / (nA + nB)
    cells resampled from half B, the width scaled to members of n cells."""
    t = time.perf_counter()
    rows = []
    for group in groups:
        rng = np.random.default_rng([args.seed, *_key(group.perturbation, group.cell_type), 2**31])
        n = group.real.shape[0]
        order = rng.permutation(n)
        a, b = group.real[order[: n // 2]], group.real[order[n // 2 :]]
        size = max(2, round(len(a) * len(b) / n))
        members = [b[rng.integers(0, len(b), size)] for _ in range(args.members)]
        rows.append(_scored(group, members, a, variance_of=b, width_scale=math.sqrt(size / n)))
    return _summarized(REFERENCE, "reference", rows, time.perf_counter() - t, {})


def _summarized(name: str, kind: str, rows: list[dict], seconds: float, fallbacks: dict) -> dict:
    from .perturbation_report import aggregate

    table = aggregate([{k: row[k] for k in METRICS} for row in rows])
    if table.get("coverage_90"):
        print(f"scored {name}: coverage {table['coverage_90']['mean']:.3f}, variance R² "
              f"{table.get('variance_r2', {}).get('mean', float('nan')):.3f} ({seconds:.0f} s)",
              flush=True)  # fmt: skip
    entry = {"entry": name, "kind": kind, "table": table, "groups": rows,
             "seconds": round(seconds, 1)}  # fmt: skip
    return entry | ({"fallbacks": fallbacks} if fallbacks else {})


def _cell(stats: dict | None) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# Uncertainty of perturbation predictions: {results['task']['description']}", "",
        f"store `{results['task']['store']}`, split `{results['task']['split']}`; "
        f"{results['n_groups']} groups (perturbation x cell type) of "
        f"{len(results['task']['perturbations'])} test perturbations, "
        f"{len(results['skipped'])} skipped (< {s['min_cells']} real cells or no controls); "
        f"{s['members']} members per group, each of the real group's size; seed {s['seed']}. "
        "mean ± sd over groups.", "",
        f"`{REFERENCE}` is the calibrated reference (real cells against an independent half of "
        f"the real cells): the target coverage is 0.9 ({results['calibrated_coverage']:.3f} "
        f"expected with {s['members']} members). Below it, the predictions are overconfident "
        "(too little spread); above it, too vague. Width: the mean 90% interval of the member "
        "means (log1p); variance R²: per-gene variance of the predicted cells against the real "
        "cells' (1 is perfect; below 0, worse than a constant).", "",
        "| entry | variance R² ↑ | coverage of the 90% interval | mean interval width | groups |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for entry in results["entries"]:
        if "refused" in entry:
            lines.append(f"| {entry['entry']} | refused: {entry['refused']} | | | |")
            continue
        t = entry["table"]
        lines.append(f"| {entry['entry']} | {_cell(t.get('variance_r2'))} | "
                     f"{_cell(t.get('coverage_90'))} | {_cell(t.get('interval_width'))} | "
                     f"{len(entry['groups'])} |")  # fmt: skip
    return "\n".join([*lines, ""])


def _write(out: Path, results: dict) -> None:
    """results.json and results.md, each written to a temporary sibling and renamed."""
    import os

    from latentcell.data_pipelines.atomic import write_json_atomic

    write_json_atomic(out / "results.json", _plain(results))
    tmp = out / f".results.md.tmp-{os.getpid()}"
    try:
        tmp.write_text(markdown(results))
        os.replace(tmp, out / "results.md")
    finally:
        tmp.unlink(missing_ok=True)


def _plain(value):
    """JSON values: NaN and infinities (e.g. in a training summary) as null, paths as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


if __name__ == "__main__":
    import sys

    from latentcell.benchmarks.cli import standalone

    sys.exit(standalone(__doc__, add_arguments, run))
