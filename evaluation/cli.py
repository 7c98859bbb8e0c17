"""``latentcell evaluate generation|perturbation``: judge model output against real cells.

Thin wrappers over ``evaluate_generation`` (generated counts vs real held-out counts) and
``evaluate_perturbation`` (predicted perturbation responses, scored by cell-eval): each reads
the files, maps every input problem to a ``DataValidationError`` naming the file (the launcher
prints it as one ``error:`` line and exits 2), writes ``summary.json`` (and figures or
cell-eval's csv files) to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.lazy_commands import lazy_command

# Columns of the printed table: (key in the flattened method scores, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mmd", "MMD"),
    ("energy_distance", "energy"),
    ("wasserstein", "W2"),
    ("knn_auc", "kNN_AUC"),
    ("precision", "prec"),
    ("recall", "recall"),
    ("density", "dens"),
    ("coverage", "cover"),
    ("mean_pearson", "mean_r"),
    ("var_pearson", "var_r"),
    ("zero_frac_mae", "zero_MAE"),
    ("per_gene_wasserstein", "gene_W1"),
    ("classifier_accuracy", "clf_acc"),
)


def add_evaluate_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` and its actions on the top-level subparsers."""
    evaluate = sub.add_parser("evaluate", help="judge generated cells against real cells")
    actions = evaluate.add_subparsers(dest="evaluate_command", required=True, metavar="ACTION")
    help_text = "generated counts vs real held-out counts: distances, PRDC, gene-level metrics"
    lazy_command(actions, "generation", help_text, add_generation_arguments,
                 run_evaluate_generation)  # fmt: skip
    help_text = (
        "predicted perturbation responses vs real cells, scored by cell-eval (the Virtual "
        "Cell Challenge evaluator) against the training-mean baseline and a real-vs-real "
        'ceiling; needs pip install "latentcell[celleval]"'
    )
    lazy_command(actions, "perturbation", help_text, add_perturbation_arguments,
                 run_evaluate_perturbation)  # fmt: skip


def add_generation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``latentcell evaluate generation``."""
    from latentcell.evaluation.protocol import DEFAULT_PROTOCOL, min_cells_floor

    d = DEFAULT_PROTOCOL
    parser.add_argument("--generated", required=True, help="h5ad of generated raw counts")
    parser.add_argument("--real", required=True, help="h5ad of real held-out raw counts")
    parser.add_argument(
        "--condition-col",
        required=True,
        help="obs column naming the condition; several, comma-separated, group cells by "
        "their combination (e.g. cell_type,condition)",
    )
    parser.add_argument(
        "--classifier-col",
        default=None,
        help="obs column(s) the classifier predicts, comma-separated like --condition-col "
        "(default: the condition columns; e.g. cell_type when groups are cell_type,condition)",
    )
    parser.add_argument("--out", required=True, help="folder for summary.json and figures")
    parser.add_argument("--train", help="h5ad of the real training counts (optional)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=FILE.h5ad",
        help="generated counts of another method; repeat for several",
    )
    parser.add_argument("--n-hvg", type=int, default=d.n_hvg)
    parser.add_argument("--n-pcs", type=int, default=d.n_pcs)
    parser.add_argument(
        "--min-cells",
        default=str(d.min_cells),
        help=f"reference cells a condition needs to be scored; 'auto' (default): the smallest "
        f"condition's, clamped to [2 * knn_k + 2, 50] (= [{min_cells_floor(d.knn_k)}, 50])",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--run", default=None, metavar="RUN_DIR",
        help="the training run (run.dir) the cells came from: log this evaluation (summary, "
        "figures, headline numbers as tags) to its MLflow run",
    )  # fmt: skip
    return parser


def add_perturbation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``latentcell evaluate perturbation``."""
    from latentcell.evaluation.perturbation import PROFILES

    parser.add_argument(
        "--pred", required=True, help="h5ad of predicted raw counts, with real's control cells"
    )
    parser.add_argument("--real", required=True, help="h5ad of real held-out raw counts")
    parser.add_argument(
        "--train", required=True, help="h5ad of the training raw counts (for the baseline)"
    )
    parser.add_argument("--out", required=True, help="folder for summary.json and csv files")
    parser.add_argument("--pert-col", default="target_gene", help="obs column of perturbations")
    parser.add_argument("--control", default="non-targeting", help="label of control cells")
    parser.add_argument("--profile", default="full", choices=PROFILES, help="cell-eval metrics")
    parser.add_argument("--threads", type=int, default=2, help="threads for cell-eval")
    parser.add_argument(
        "--run", default=None, metavar="RUN_DIR",
        help="the training run (run.dir) the cells came from: log this evaluation (summary, "
        "figures, headline numbers as tags) to its MLflow run",
    )  # fmt: skip
    return parser


def parse_baselines(specs: list[str]) -> dict[str, Path]:
    """``["NAME=FILE", ...]`` -> ``{NAME: FILE}``; malformed or repeated names are errors."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise DataValidationError(
                spec, "--baseline", "expected NAME=FILE.h5ad", "write e.g. vae_prior=prior.h5ad"
            )
        if name in out:
            raise DataValidationError(
                spec, "--baseline", f"baseline name {name!r} given twice", "use distinct names"
            )
        out[name] = Path(path)
    return out


def _read(path: Path):
    from latentcell.data_pipelines.read_h5ad import read_h5ad

    return read_h5ad(path)


def parse_min_cells(value: str) -> int | str:
    """``--min-cells``: ``auto`` or an integer."""
    from latentcell.evaluation.protocol import MIN_CELLS_AUTO

    if value == MIN_CELLS_AUTO:
        return value
    try:
        return int(value)
    except ValueError:
        raise DataValidationError(
            "<options>", "--min-cells", f"expected 'auto' or an integer, got {value!r}",
            "pass --min-cells auto or e.g. --min-cells 50",
        ) from None  # fmt: skip


def _format_value(value: float | None, sd: float | None = None) -> str:
    """``0.5781``, or ``0.578±0.027`` for a mean over sampling seeds, or ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.4g}" if sd is None else f"{value:.3g}±{sd:.2g}"


def format_table(
    scores: dict[str, dict[str, float | None]],
    spread: dict[str, dict[str, float | None]] | None = None,
) -> str:
    """Macro (and pooled) metrics, one row per method; with ``spread`` (method -> sd over
    sampling seeds), that method's cells read mean ± sd."""
    spread = spread or {}
    cells = {
        name: [_format_value(values.get(k), spread.get(name, {}).get(k)) for k, _ in TABLE_COLUMNS]
        for name, values in scores.items()
    }
    widths = [
        max(10, len(header) + 1, *(len(row[i]) + 1 for row in cells.values()))
        for i, (_, header) in enumerate(TABLE_COLUMNS)
    ]
    width = max(len(name) for name in scores) + 2

    def line(label: str, row: list[str]) -> str:
        return label.ljust(width) + "".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True))

    rows = [line("method", [h for _, h in TABLE_COLUMNS])]
    rows += [line(name, row) for name, row in cells.items()]
    return "\n".join(rows)


def seed_spread(summary: dict) -> dict[str, dict[str, float | None]]:
    """The sd over sampling seeds of each metric, for the methods scored per seed."""
    return {name: report["sd"] for name, report in summary["seeds"]["methods"].items()}


def summary_lines(summary: dict) -> list[str]:
    """What was evaluated: conditions and min_cells, skipped conditions with why, seeds."""
    used = summary["min_cells"]
    how = "auto" if used["auto"] else "given"
    skipped = summary["skipped_conditions"]
    lines = [
        f"{len(summary['conditions'])} conditions evaluated, {len(skipped)} skipped; "
        f"min_cells {used['used']} ({how}); classifier predicts "
        f"{summary['classifier']['column']}; {summary['n_genes_used']} genes, "
        f"{summary['n_pcs_used']} PCs"
    ]
    if skipped:
        items = [f"{c}: {v['n_cells']} cells, {v['reason']}" for c, v in skipped.items()]
        lines.append("skipped: " + "; ".join(items))
    for name, report in summary["seeds"]["methods"].items():
        seeds = ", ".join(str(s) for s in report["seeds"])
        lines.append(
            f"{name}: {len(report['seeds'])} sampling seeds ({seeds}), scored separately; "
            "table shows mean ± sd, the PCA figure the first seed"
        )
    return lines


def run_evaluate_generation(args: argparse.Namespace) -> int:
    """CLI entry: evaluate, write ``--out``, print the table; bad input raises for the launcher."""
    from latentcell.evaluation.generation import (
        GENERATED,
        bar_scores,
        baseline_source,
        evaluate_generation,
    )
    from latentcell.evaluation.protocol import GenerationProtocol

    min_cells = parse_min_cells(args.min_cells)
    _check_run(args)
    try:
        protocol = GenerationProtocol(
            n_hvg=args.n_hvg, n_pcs=args.n_pcs, min_cells=min_cells, seed=args.seed
        )
    except ValueError as exc:
        raise DataValidationError("<options>", "protocol", str(exc), "change the option") from exc
    baseline_paths = parse_baselines(args.baseline)
    paths = {"real": Path(args.real), GENERATED: Path(args.generated)}
    if args.train:
        paths["train"] = Path(args.train)
    paths.update({baseline_source(n): p for n, p in baseline_paths.items()})
    data = {role: _read(path) for role, path in paths.items()}
    try:
        summary = evaluate_generation(
            data[GENERATED],
            data["real"],
            args.condition_col,
            classifier_col=args.classifier_col,
            train=data.get("train"),
            baselines={n: data[baseline_source(n)] for n in baseline_paths},
            protocol=protocol,
            out_dir=args.out,
        )
    except DataValidationError as err:  # name the file, not the role
        path = paths.get(err.path, err.path)
        raise DataValidationError(path, err.field, err.problem, err.fix) from None
    for line in summary_lines(summary):
        print(line)
    print(format_table(bar_scores(summary), seed_spread(summary)))
    print(f"wrote {Path(args.out) / 'summary.json'} and figures")
    if args.run:
        macro = summary["methods"][GENERATED]["macro"]
        keys = ("energy_distance", "mmd", "knn_auc", "mean_pearson", "var_pearson")
        _log_to_run(args, "generation", {k: macro.get(k) for k in keys})
    return 0


def _check_run(args: argparse.Namespace) -> None:
    """A bad --run fails before the evaluation, not after it."""
    if args.run:
        from latentcell.evaluation.run_logging import tracked_run

        tracked_run(args.run)


def _log_to_run(args: argparse.Namespace, kind: str, headline: dict) -> None:
    from latentcell.evaluation.run_logging import log_evaluation

    print(f"logged to MLflow: {log_evaluation(args.run, kind, args.out, headline)}")


# (key in the summary's headline, printed name)
PERTURBATION_ROWS: tuple[tuple[str, str], ...] = (
    ("avg_score", "avg_score"),
    ("cell_eval_avg_score", "cell-eval avg"),
    ("vcc_avg_score", "vcc_avg_score"),
    ("overlap_at_N", "overlap_at_N"),
    ("discrimination_score_l1", "discrim_l1"),
    ("mae", "mae"),
    ("pearson_delta", "pearson_delta"),
)


def _cell(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.4g}"


def format_perturbation_table(summary: dict) -> str:
    """Headline metrics: model, baseline, ceiling and the model's score against the baseline;
    then the metrics degenerate for this input (left out of avg_score) with the reason.
    ``avg_score`` is over the meaningful metrics, ``cell-eval avg`` cell-eval's own over all."""
    rows = ["metric".ljust(16) + "".join(f"{h:>10}" for h in ("model", "baseline", "ceiling"))]
    rows[0] += f"{'score':>10}"
    for key, name in PERTURBATION_ROWS:
        entry = summary["headline"].get(key)
        if entry is None:
            continue
        values = [entry.get(k) for k in ("model", "baseline", "ceiling")]
        score = entry["model"] if key.endswith("avg_score") else entry.get("score")
        cell = f"{'degen.':>10}" if entry.get("degenerate") else _cell(score)
        rows.append(name.ljust(16) + "".join(_cell(v) for v in values) + cell)
    energy = summary["energy_distance"]
    rows.append("energy_PCA".ljust(16) + _cell(energy["model"]) + _cell(energy["baseline"]))
    degenerate = summary.get("degenerate") or {}
    if degenerate:
        rows.append(
            f"degenerate for this input, not in avg_score ({len(degenerate)}; "
            "cell-eval avg includes them):"
        )
        by_reason: dict[str, list[str]] = {}
        for metric, reason in degenerate.items():
            by_reason.setdefault(reason, []).append(metric)
        rows += [f"  {', '.join(metrics)}: {reason}" for reason, metrics in by_reason.items()]
    restricted = summary.get("restricted") or {}
    if restricted:
        left_out = restricted["perturbations_left_out"]
        rows.append(
            f"DE metrics averaged without {len(left_out)} perturbation(s) that have no "
            f"significant real DE genes: {', '.join(left_out[:10])}"
        )
    rows += scoreboard_rows(summary.get("scoreboards"))
    return "\n".join(rows)


def scoreboard_rows(boards: dict | None) -> list[str]:
    """The seed designs' scoreboards, model and baseline, means over perturbations (003: gene
    space; 004: the embedding the summary names); a degenerate metric reads ``degen.``."""
    if not boards:
        return []
    model, baseline = boards["model"], boards["baseline"]
    degenerate = boards.get("degenerate") or {}
    width = max(len(key) for key in model) + 2
    rows = [f"seed scoreboards (means over perturbations; embedding: {boards['embedding']})"]
    rows.append("scoreboard".ljust(width) + f"{'model':>10}{'baseline':>10}")
    for key, value in model.items():
        cells = (
            f"{'degen.':>10}" * 2 if key in degenerate else _cell(value) + _cell(baseline.get(key))
        )
        rows.append(key.ljust(width) + cells)
    return rows


def run_evaluate_perturbation(args: argparse.Namespace) -> int:
    """CLI entry: check cell-eval is installed, evaluate, write ``--out``, print the table."""
    from latentcell.evaluation.perturbation import (
        ControlCellsWarning,
        evaluate_perturbation,
        import_cell_eval,
    )

    if args.threads < 1:
        raise DataValidationError("<options>", "--threads", "must be >= 1", "pass --threads 1")
    _check_run(args)
    try:
        import_cell_eval(args.threads)
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    paths = {"pred": Path(args.pred), "real": Path(args.real), "train": Path(args.train)}
    data = {role: _read(path) for role, path in paths.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ControlCellsWarning)  # printed below instead
            summary = evaluate_perturbation(
                data["pred"],
                data["real"],
                data["train"],
                args.out,
                pert_col=args.pert_col,
                control=args.control,
                profile=args.profile,
                threads=args.threads,
            )
    except DataValidationError as err:  # name the file, not the role
        path = paths.get(err.path, err.path)
        raise DataValidationError(path, err.field, err.problem, err.fix) from None
    for note in summary["warnings"]:
        print(f"warning: {note}")
    print(
        f"{len(summary['perturbations'])} perturbations, {summary['n_genes']} genes; "
        f"cell-eval {summary['cell_eval_version']}, profile {summary['profile']}"
    )
    print(format_perturbation_table(summary))
    print(f"wrote {Path(args.out) / 'summary.json'}, cell-eval's csv files and the scoreboards")
    if args.run:
        _log_to_run(
            args, "perturbation", {k: v.get("model") for k, v in summary["headline"].items()}
        )
    return 0
