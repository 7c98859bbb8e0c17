"""``evaluate_perturbation``: predicted perturbation responses judged by cell-eval.

cell-eval (``pip install "latentcell[celleval]"``, i.e. ``cell-eval>=0.8,<0.9``) is the Virtual
Cell Challenge (VCC) evaluator; it is optional and imported only when this runs. Three runs of
its Python API, all against the same REAL cells and with the same metric ``profile``:
- ``model``: PRED against REAL. Its real DE table (``model/real_de.csv``) is computed here ONCE;
- ``baseline``: cell-eval's training cell-mean baseline (``build_base_mean_adata``) built from
  TRAIN's expression only, against REAL, reusing that real DE table;
- ``ceiling``: cell-eval's own real-vs-real ceiling (``MetricsEvaluator.compute_ceiling``):
  REAL's cells of each perturbation and of the control split into two disjoint halves, scored
  against each other, then Spearman-Brown corrected to full depth (cell-eval >= 0.8.2; 0.8.0
  and 0.8.1 use a bootstrap self-split instead, named in the summary). cell-eval reports no
  ceiling for error metrics such as ``mae`` (null); ``ceiling_raw_half_depth`` is the
  uncorrected mean over perturbations of the self-split, for every metric.
``score_agg_metrics`` then scales the model against the baseline, as the VCC did: higher-better
metrics ``(u - b) / (1 - b)``, lower-better ``1 - u / b``, clipped at 0, and ``avg_score`` is
their mean (0 = no better than the training mean; by construction 0 for the baseline itself).
Metrics that are degenerate for the input (one perturbation: discrimination is 1 for every
method; DE metrics of perturbations without real DE genes; metrics cell-eval raised on; scores
that are undefined) are listed with the reason (``degenerate``, ``restricted``) and left out of
``avg_score``, which is recomputed over the meaningful metrics (``degenerate_metrics``);
cell-eval's own mean over every metric is kept beside it as ``cell_eval_avg_score``.

Why the Python API rather than the ``cell-eval`` command: the files are normalised once here and
handed over in memory, the real DE frame is reused without a re-read, the baseline's control
cells can be set (below), and a failure is a Python exception, not a parsed exit status.

Preprocessing, identical for the three files: raw counts are required; ``normalize_total`` to
1e4 then log1p, in float32 CSR. cell-eval sees log1p floats and does not re-normalise. (Its own
command normalises each file to ITS median library size, so the numbers differ slightly from
``cell-eval run`` on the raw files; a fixed target keeps the files on one scale.)

The baseline: cell-eval's mean of the per-group means of TRAIN (the groups include TRAIN's
control, as in cell-eval), repeated for as many cells as REAL has for each perturbation (only
REAL's labels and cell numbers are used, like the VCC's ``pert_counts`` file, never its
expression), plus REAL's control cells. cell-eval's builder appends TRAIN's control cells; here
they are replaced by REAL's, the cells the prediction file must carry too, so that the model's
and the baseline's deltas are both taken against the same control cells.

Energy distance (not part of cell-eval): per perturbation, between PRED (and the baseline) and
REAL cells in a PCA-50 space of log1p(normalize_total 1e4) expression over all genes, then
macro-averaged over perturbations. The PCA is fitted on one half of REAL's cells of every group
(seeded, per perturbation and the control) and the other half is the reference; the compared
sets are subsampled to the reference's size. Why not fit on the reference itself: a PCA fitted
on the cells it then compares inflates their spread along noise directions, and every other set
is projected without that inflation (measured in ``latentcell.evaluation.splits``).

The seed designs' scoreboards (``latentcell.evaluation.scoreboards``, not part of cell-eval):
seed 003's gene-space mean-shift Pearson r and top-K Jaccard, seed 004's embedding R², MSE,
energy distance and kNN purity, for the model and the baseline through the same function,
against REAL's control cells; means in the summary (``scoreboards``), every perturbation's
values in ``scoreboard_per_perturbation.csv``, seed 003's figure in
``figures/scoreboard_003.png``.

VCC submission: copy REAL's control cells into the prediction file (labels in ``target_gene``,
control ``non-targeting``, or pass ``--pert-col`` / ``--ntc-name``), write the challenge's gene
order as a one-column csv without header (``genes.csv``), then
    cell-eval prep -i pred.h5ad -g genes.csv
writes ``pred.prep.vcc``, a tar of ``pred.h5ad.zst`` and a watermark. It needs the ``zstd`` and
``tar`` programs on PATH, reorders genes given in another order, refuses missing or extra genes
and more than 200,000 cells (``--max-cell-dim -1`` lifts that), and normalises integer counts
itself (median library size, log1p).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.atomic import write_json_atomic
from latentcell.data_pipelines.errors import DataValidationError, LatentcellWarning
from latentcell.evaluation import degenerate_metrics as dm
from latentcell.evaluation import metrics as m
from latentcell.evaluation import scoreboards as sb
from latentcell.evaluation.generation import to_jsonable
from latentcell.evaluation.protocol import RealPCA, check_counts, reference_genes
from latentcell.evaluation.scoreboard_figure import write_scoreboard_figure
from latentcell.evaluation.splits import shuffled_rows

PRED, REAL, TRAIN = "pred", "real", "train"
MODEL, BASELINE, CEILING = "model", "baseline", "ceiling"
PROFILES = ("full", "vcc", "minimal", "de", "anndata")  # cell-eval's, less "pds" (no DE)
HEADLINE_METRICS = ("overlap_at_N", "discrimination_score_l1", "mae", "pearson_delta")
VCC_METRICS = ("mae", "discrimination_score_l1", "overlap_at_N")  # cell-eval's "vcc" profile
TARGET_SUM = 1e4
SUMMARY_FILE = "summary.json"
SCORE_FILE = "score.csv"
MEANINGFUL_SCORE_FILE = "score_meaningful.csv"
SCOREBOARD_FILE = "scoreboard_per_perturbation.csv"
SCOREBOARD_FIGURE = "figures/scoreboard_003.png"
INSTALL_HINT = (
    'cell-eval is not installed; install it with: pip install "latentcell[celleval]" '
    '(or pip install "cell-eval>=0.8,<0.9")'
)


@dataclass(frozen=True)
class EnergySettings:
    """The energy-distance protocol; logged in the summary."""

    n_pcs: int = 50
    max_cells: int = 2000  # per perturbation and side; pairwise distances are n x m
    seed: int = 0


DEFAULT_ENERGY = EnergySettings()  # frozen, so safe as a shared default argument


class ControlCellsWarning(LatentcellWarning):
    """PRED's control cells do not look like REAL's (the CLI prints these as one line)."""


def import_cell_eval(threads: int):
    """The ``cell_eval`` module, or an ImportError that says how to install it.

    Caps polars at ``threads`` when polars is not imported yet (it reads the variable once);
    a value already in the environment wins.
    """
    os.environ.setdefault("POLARS_MAX_THREADS", str(threads))
    try:
        import cell_eval
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return cell_eval


# ---------------------------------------------------------------- input checks


def perturbation_labels(adata: ad.AnnData, pert_col: str) -> np.ndarray:
    """The perturbation of each cell, as strings."""
    return adata.obs[pert_col].astype(str).to_numpy()


def check_pert_col(adata: ad.AnnData, source: str, pert_col: str) -> None:
    """The perturbation column must exist in ``obs``."""
    if pert_col not in adata.obs.columns:
        raise DataValidationError(
            source,
            f"obs['{pert_col}']",
            f"column not found (obs has {list(adata.obs.columns)[:10]})",
            "pass --pert-col naming the perturbation column of every input",
        )


def check_control(adata: ad.AnnData, source: str, pert_col: str, control: str) -> None:
    """Every file needs control cells; the prediction's are the reference of its deltas."""
    labels = perturbation_labels(adata, pert_col)
    if (labels == control).any():
        return
    if source == PRED:
        fix = (
            "copy REAL's control cells into the prediction file: cell-eval takes the "
            "predicted delta against the prediction file's own control cells"
        )
    else:
        fix = "pass --control naming the control label of the files"
    raise DataValidationError(
        source,
        f"obs['{pert_col}']",
        f"control label {control!r} not found (labels: {sorted(set(labels))[:10]})",
        fix,
    )


def check_gene_order(adata: ad.AnnData, source: str, genes: pd.Index) -> None:
    """``var_names`` must equal REAL's, in order: cell-eval compares genes by position."""
    names = pd.Index(adata.var_names.astype(str))
    if names.equals(genes):
        return
    if len(names) == len(genes) and set(names) == set(genes):
        i = int(np.flatnonzero(names.to_numpy() != genes.to_numpy())[0])
        problem = (
            f"same genes as real but in another order (position {i}: {names[i]!r}, "
            f"real has {genes[i]!r})"
        )
        fix = "reorder to real's genes, e.g. adata = adata[:, real.var_names].copy()"
    else:
        missing = genes.difference(names, sort=False)
        extra = names.difference(genes, sort=False)
        problem = (
            f"{len(missing)} of real's {len(genes)} genes missing, {len(extra)} extra "
            f"(e.g. {(list(missing) + list(extra))[0]!r})"
        )
        fix = "write exactly real's var_names, in real's order"
    raise DataValidationError(source, "var_names", problem, fix)


def check_same_perturbations(pred: ad.AnnData, real: ad.AnnData, pert_col: str) -> None:
    """PRED must hold exactly REAL's perturbations (cell-eval requires equal sets)."""
    pred_set = set(perturbation_labels(pred, pert_col))
    real_set = set(perturbation_labels(real, pert_col))
    missing, extra = sorted(real_set - pred_set), sorted(pred_set - real_set)
    if missing:
        raise DataValidationError(
            PRED,
            f"obs['{pert_col}']",
            f"{len(missing)} perturbation(s) of real have no predicted cells (e.g. {missing[0]!r})",
            "predict cells for every perturbation of the real file",
        )
    if extra:
        raise DataValidationError(
            PRED,
            f"obs['{pert_col}']",
            f"{len(extra)} perturbation(s) are not in real (e.g. {extra[0]!r})",
            "drop them: cell-eval needs the same perturbation set in both files",
        )


def check_train_perturbations(train: ad.AnnData, pert_col: str, control: str) -> None:
    """The baseline is a mean over TRAIN's perturbations, so it needs at least one."""
    if (perturbation_labels(train, pert_col) != control).any():
        return
    raise DataValidationError(
        TRAIN,
        f"obs['{pert_col}']",
        "only control cells: the training-mean baseline needs perturbed training cells",
        "pass the training split with its perturbed cells",
    )


def _rows_identical(x) -> bool:
    """True when every row of ``x`` (dense or sparse) is the same."""
    x = sp.csr_matrix(x)
    return (x.max(axis=0) != x.min(axis=0)).nnz == 0


def check_varied_cells(pred: ad.AnnData, pert_col: str, control: str) -> None:
    """Every predicted perturbation needs 2+ distinct cells.

    Why: cell-eval's DE is a Mann-Whitney U test per gene against the control cells, and a
    block of identical cells makes thousands of genes "significant".
    """
    labels = perturbation_labels(pred, pert_col)
    bad = []
    for pert in sorted(set(labels) - {control}):
        rows = np.flatnonzero(labels == pert)
        if len(rows) < 2 or _rows_identical(pred.X[rows]):
            bad.append(pert)
    if bad:
        raise DataValidationError(
            PRED,
            "X",
            f"{len(bad)} perturbation(s) have constant-valued predicted cells (all cells "
            f"identical, or a single cell; e.g. {bad[0]!r}); cell-eval's Mann-Whitney DE "
            "calls spurious genes on them",
            "predict cell-level variation (sample cells from the model), not copies of a mean",
        )


def control_warnings(pred: ad.AnnData, real: ad.AnnData, pert_col: str, control: str) -> list:
    """Warnings when PRED's control cells do not look like REAL's (same number, same sums).

    Not an error: a subsample of REAL's controls is legitimate. But the predicted delta is taken
    against PRED's controls, so other control cells change (and can game) every score.
    """
    pred_rows = np.flatnonzero(perturbation_labels(pred, pert_col) == control)
    real_rows = np.flatnonzero(perturbation_labels(real, pert_col) == control)
    if len(pred_rows) != len(real_rows):
        return [
            f"pred has {len(pred_rows)} control cells, real has {len(real_rows)}: copy "
            "real's control cells into the prediction file, since cell-eval takes the "
            "predicted delta against the prediction file's controls"
        ]
    pred_sums = np.asarray(sp.csr_matrix(pred.X[pred_rows]).sum(axis=0)).ravel()
    real_sums = np.asarray(sp.csr_matrix(real.X[real_rows]).sum(axis=0)).ravel()
    if not np.allclose(pred_sums, real_sums):
        return [
            "pred's control cells differ from real's (per-gene sums): copy real's control "
            "cells into the prediction file, since cell-eval takes the predicted delta "
            "against the prediction file's controls"
        ]
    return []


def check_inputs(
    pred: ad.AnnData, real: ad.AnnData, train: ad.AnnData, pert_col: str, control: str
) -> list[str]:
    """Every check, before anything runs or is written; returns the warnings."""
    inputs = {REAL: real, PRED: pred, TRAIN: train}
    for source, adata in inputs.items():
        check_pert_col(adata, source, pert_col)
        check_counts(adata, source)
        check_control(adata, source, pert_col, control)
    genes = reference_genes(real, REAL)
    check_gene_order(pred, PRED, genes)
    check_gene_order(train, TRAIN, genes)
    check_same_perturbations(pred, real, pert_col)
    check_train_perturbations(train, pert_col, control)
    check_varied_cells(pred, pert_col, control)
    return control_warnings(pred, real, pert_col, control)


# ---------------------------------------------------------------- data for cell-eval


def log_normalized(adata: ad.AnnData, pert_col: str, prefix: str) -> ad.AnnData:
    """A minimal AnnData: log1p(counts / total * 1e4) as float32 CSR, obs = ``pert_col`` only.

    Cells with no counts stay all zero. Cell names are ``prefix0, prefix1, ...`` (unique
    when files are concatenated).
    """
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    x = sp.csr_matrix(sp.diags(scale) @ x)
    x.data = np.log1p(x.data)
    obs = pd.DataFrame(
        {pert_col: perturbation_labels(adata, pert_col)},
        index=[f"{prefix}{i}" for i in range(adata.n_obs)],
    )
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    return ad.AnnData(x.astype(np.float32), obs=obs, var=var)


def train_mean_baseline(
    cell_eval, train: ad.AnnData, real: ad.AnnData, pert_col: str, control: str, threads: int
) -> ad.AnnData:
    """cell-eval's cell-mean baseline from TRAIN (log1p), sized like REAL, REAL's controls."""
    import polars as pl

    labels = perturbation_labels(real, pert_col)
    perts, n_cells = np.unique(labels[labels != control], return_counts=True)
    counts = pl.DataFrame({pert_col: perts.tolist(), "n_cells": n_cells.tolist()})
    built = cell_eval.build_base_mean_adata(
        train,  # log1p floats, which cell-eval leaves as they are
        counts_df=counts,
        pert_col=pert_col,
        control_pert=control,
        counts_col="n_cells",
        num_threads=threads,
    )
    mean_cells = built[perturbation_labels(built, pert_col) != control]
    mean_cells = ad.AnnData(
        sp.csr_matrix(mean_cells.X, dtype=np.float32),
        obs=pd.DataFrame(
            {pert_col: perturbation_labels(mean_cells, pert_col)},
            index=[f"baseline{i}" for i in range(mean_cells.n_obs)],
        ),
        var=real.var.copy(),
    )
    return ad.concat([mean_cells, real[labels == control]], merge="first")


# ---------------------------------------------------------------- cell-eval runs


def agg_means(agg) -> dict[str, float | None]:
    """Metric -> value of an aggregate table: its ``mean`` row (``describe`` layout) or,
    for cell-eval's Spearman-Brown ceiling table, its single row."""
    if "statistic" in agg.columns:
        row = agg.filter(agg["statistic"] == "mean").drop("statistic")
    else:
        row = agg.head(1)
    return {k: (None if v is None else float(v)) for k, v in row.to_dicts()[0].items()}


def per_perturbation_means(results) -> dict[str, float | None]:
    """Metric -> mean over perturbations of a ``results`` table (nulls skipped)."""
    return agg_means(results.drop("perturbation").mean())


def run_model_and_ceiling(cell_eval, pred, real, out: Path, pert_col, control, profile, threads):
    """PRED vs REAL (writes ``real_de.csv``, ``pred_de.csv``, ``results.csv``,
    ``agg_results.csv``) and the real-vs-real ceiling (``ceiling_results.csv``,
    ``agg_ceiling_results.csv``), all in ``out``; returns (results, agg, ceiling agg,
    ceiling results, ceiling method)."""
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=pred,
        adata_real=real,
        control_pert=control,
        pert_col=pert_col,
        num_threads=threads,
        outdir=str(out),
    )
    results, agg = evaluator.compute(profile=profile)
    ceiling_results, ceiling_agg = evaluator.compute_ceiling(profile=profile, seed=0)
    method = (
        "disjoint split-half of real per perturbation, Spearman-Brown corrected"
        if hasattr(evaluator, "_disjoint_halves")
        else "bootstrap self-split of real per perturbation (cell-eval < 0.8.2)"
    )
    return results, agg, ceiling_agg, ceiling_results, method


def run_baseline(
    cell_eval, baseline, real, real_de: Path, out: Path, pert_col, control, profile, threads
):
    """Baseline vs REAL with the model run's real DE table (not recomputed): (results, agg)."""
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=baseline,
        adata_real=real,
        de_real=str(real_de),
        control_pert=control,
        pert_col=pert_col,
        num_threads=threads,
        outdir=str(out),
    )
    return evaluator.compute(profile=profile)


def score_against_baseline(cell_eval, model_agg, base_agg, path: Path) -> tuple[dict, list]:
    """cell-eval's own per-metric scores and ``avg_score`` (``score_agg_metrics``) on the
    metrics both runs produced, degenerate ones included; also returns the metrics only one
    run produced (cell-eval logs and drops a metric that raises)."""
    from cell_eval.metrics import metrics_registry

    registered = set(metrics_registry.list_metrics())  # the others cell-eval skips, warning
    common = [
        c
        for c in model_agg.columns
        if c in base_agg.columns and (c == "statistic" or c in registered)
    ]
    one_sided = sorted(set(model_agg.columns) ^ set(base_agg.columns))
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 of a degenerate metric
        table = cell_eval.score_agg_metrics(
            model_agg.select(common), base_agg.select(common), output=str(path)
        )
    return dict(
        zip(table["metric"].to_list(), table["from_baseline"].to_list(), strict=True)
    ), one_sided


# ---------------------------------------------------------------- energy distance


def _dense(adata: ad.AnnData, rows: np.ndarray) -> np.ndarray:
    x = adata.X[rows]
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def energy_distances(
    methods: Mapping[str, ad.AnnData],
    real: ad.AnnData,
    pert_col: str,
    control: str,
    settings: EnergySettings,
) -> dict:
    """Per-perturbation and macro energy distance of each method to REAL (log1p inputs);
    see the module docstring for the PCA and the halves."""
    real_labels = perturbation_labels(real, pert_col)
    pca_rows, reference = [], {}
    for group in sorted(set(real_labels)):
        rows = shuffled_rows(real_labels, group, settings.seed, REAL)
        half = len(rows) // 2
        pca_rows.append(rows[:half][: settings.max_cells])
        reference[group] = rows[half:][: settings.max_cells]
    pca = RealPCA.fit(_dense(real, np.concatenate(pca_rows)), settings.n_pcs, settings.seed)
    per_perturbation: dict[str, dict[str, float]] = {}
    for pert in sorted(set(real_labels) - {control}):
        ref = pca.transform(_dense(real, reference[pert]))
        per_perturbation[pert] = {}
        for name, adata in methods.items():
            labels = perturbation_labels(adata, pert_col)
            rows = shuffled_rows(labels, pert, settings.seed, name)[: len(ref)]
            cells = pca.transform(_dense(adata, rows))
            per_perturbation[pert][name] = m.energy_distance(ref, cells)
    macro = {name: float(np.mean([v[name] for v in per_perturbation.values()])) for name in methods}
    return {
        **macro,
        "per_perturbation": per_perturbation,
        "n_pcs_used": int(pca.components.shape[0]),
        "settings": {
            "n_pcs": settings.n_pcs,
            "max_cells": settings.max_cells,
            "seed": settings.seed,
            "space": "PCA of log1p(normalize_total 1e4), all genes",
            "pca_fit": "real: one half of each group's cells (incl. control); the other half "
            "is the reference, and each method is subsampled to its size",
        },
    }


# ---------------------------------------------------------------- seed scoreboards


def scoreboards(
    methods: Mapping[str, ad.AnnData], real: ad.AnnData, pert_col: str, control: str, out: Path
) -> dict:
    """The seeds' scoreboards (``latentcell.evaluation.scoreboards``) of each method against
    REAL (log1p inputs), the shifts taken against REAL's control cells. Writes every
    perturbation's values (``SCOREBOARD_FILE``) and the first method's seed 003 figure, with
    the second's J(K) beside it (``SCOREBOARD_FIGURE``); returns the means for the summary."""
    labels = perturbation_labels(real, pert_col)
    perturbed = labels != control
    real_x, real_labels, control_x = real.X[perturbed], labels[perturbed], real.X[~perturbed]
    boards, arrays = {}, {}
    for name, adata in methods.items():
        method_labels = perturbation_labels(adata, pert_col)
        keep = method_labels != control
        arrays[name] = (adata.X[keep], method_labels[keep], real_x, real_labels, control_x)
        boards[name] = sb.perturbation_scoreboard(*arrays[name])
    rows = [
        {"method": name, "perturbation": pert, **values}
        for name, board in boards.items()
        for pert, values in board["per_perturbation"].items()
    ]
    tmp = out / f".{SCOREBOARD_FILE}.tmp-{os.getpid()}"
    try:
        pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, out / SCOREBOARD_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    first, *rest = boards
    write_scoreboard_figure(
        out / SCOREBOARD_FIGURE, *arrays[first], boards[first], boards[rest[0]] if rest else None
    )
    any_board = boards[first]
    return {
        **{name: board["mean"] for name, board in boards.items()},
        "degenerate": any_board["degenerate"],  # depends on the input, not the method
        "embedding": any_board["embedding"],
        "settings": any_board["settings"],
    }


# ---------------------------------------------------------------- summary


def vcc_avg_score(scores: Mapping) -> float | None:
    """Mean score of the VCC profile's three metrics (the VCC leaderboard's overall score);
    None when one of them has no score (absent, or degenerate for the input)."""
    values = [scores.get(k) for k in VCC_METRICS]
    return None if any(v is None for v in values) else float(np.mean(values))


def headline(
    scores: Mapping, metrics: Mapping[str, Mapping], cell_eval_scores: Mapping, degenerate: Mapping
) -> dict:
    """``avg_score`` (over the meaningful metrics), cell-eval's own ``cell_eval_avg_score``
    (over every metric), ``vcc_avg_score`` and four metrics for model, baseline and ceiling;
    each metric also carries the model's score against the baseline (None, with the reason
    under ``degenerate``, for a metric degenerate for the input)."""
    out = {
        name: {
            MODEL: value,
            BASELINE: 0.0,  # the baseline scored against itself, by construction
            CEILING: None,  # cell-eval scales no ceiling against the baseline
        }
        for name, value in (
            ("avg_score", scores.get("avg_score")),
            ("cell_eval_avg_score", cell_eval_scores.get("avg_score")),
            ("vcc_avg_score", vcc_avg_score(scores)),
        )
    }
    for metric in HEADLINE_METRICS:
        out[metric] = {name: values.get(metric) for name, values in metrics.items()}
        out[metric]["score"] = scores.get(metric)
        if metric in degenerate:
            out[metric]["degenerate"] = degenerate[metric]
    return out


def evaluate_perturbation(
    pred: ad.AnnData,
    real: ad.AnnData,
    train: ad.AnnData,
    out_dir: str | os.PathLike,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    profile: str = "full",
    threads: int = 2,
    energy: EnergySettings = DEFAULT_ENERGY,
) -> dict:
    """Score PRED against REAL with cell-eval, beside the TRAIN-mean baseline and the ceiling.

    Inputs hold raw counts in ``.X`` and ``obs[pert_col]``. Every input check runs before
    anything is written; a bad input raises ``DataValidationError`` whose path is the role
    (``pred``, ``real`` or ``train``). Writes cell-eval's csv files under ``out_dir``
    (``model/``, ``baseline/``, ``score.csv``), the seed scoreboards' csv and figure and
    ``summary.json``; returns the summary.
    Raises ImportError (with the install command) when cell-eval is missing.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    cell_eval = import_cell_eval(threads)
    notes = check_inputs(pred, real, train, pert_col, control)
    for note in notes:
        warnings.warn(note, ControlCellsWarning, stacklevel=2)

    from threadpoolctl import threadpool_limits

    out = Path(out_dir)
    labels = perturbation_labels(real, pert_col)
    perturbations = sorted(set(labels) - {control})
    by_input = dm.by_construction(len(perturbations))
    with threadpool_limits(limits=threads), dm.CellEvalErrors(by_input) as errors:
        real_n = log_normalized(real, pert_col, "real")
        pred_n = log_normalized(pred, pert_col, "pred")
        train_n = log_normalized(train, pert_col, "train")
        baseline = train_mean_baseline(cell_eval, train_n, real_n, pert_col, control, threads)
        run = (pert_col, control, profile, threads)
        model_results, model_agg, ceiling_agg, ceiling_results, ceiling_method = (
            run_model_and_ceiling(cell_eval, pred_n, real_n, out / MODEL, *run)
        )
        real_de = out / MODEL / "real_de.csv"
        base_results, base_agg = run_baseline(
            cell_eval, baseline, real_n, real_de, out / BASELINE, *run
        )
        cell_eval_scores, one_sided = score_against_baseline(
            cell_eval, model_agg, base_agg, out / SCORE_FILE
        )
        degenerate = {**by_input}
        for metric, message in errors.errors.items():  # raised on the baseline: no reference
            if metric not in base_results.columns:
                degenerate.setdefault(metric, f"cell-eval raised: {message}")
        kept = dm.meaningful_scores(
            cell_eval, model_results, base_results, degenerate,
            dm.real_de_counts(real_de, perturbations), out / MEANINGFUL_SCORE_FILE,
        )  # fmt: skip
        distances = energy_distances(
            {MODEL: pred_n, BASELINE: baseline}, real_n, pert_col, control, energy
        )
        seed_boards = scoreboards(
            {MODEL: pred_n, BASELINE: baseline}, real_n, pert_col, control, out
        )
    model_failed = [c for c in one_sided if c in base_agg.columns and c not in kept.degenerate]
    if model_failed:  # the baseline has them, the prediction broke them: scored 0
        notes.append(f"cell-eval produced no value for the model on {model_failed}: scored 0")

    metrics = {
        MODEL: agg_means(model_agg),
        BASELINE: agg_means(base_agg),
        CEILING: agg_means(ceiling_agg),
        "ceiling_raw_half_depth": per_perturbation_means(ceiling_results),
    }
    shown = {  # the headline: the meaningful means where there are, cell-eval's otherwise
        MODEL: {**metrics[MODEL], **kept.model},
        BASELINE: {**metrics[BASELINE], **kept.baseline},
        # cell-eval's ceiling averages every perturbation: not comparable with a mean over
        # the restricted ones (it sat below the models' on Papalexi), so none is shown
        CEILING: {
            k: v for k, v in metrics[CEILING].items() if k not in kept.restricted.get("metrics", ())
        },
    }
    files = {
        "real_de": f"{MODEL}/real_de.csv",
        "model_pred_de": f"{MODEL}/pred_de.csv",
        "model_results": f"{MODEL}/results.csv",
        "model_agg_results": f"{MODEL}/agg_results.csv",
        "ceiling_results": f"{MODEL}/ceiling_results.csv",
        "ceiling_agg_results": f"{MODEL}/agg_ceiling_results.csv",
        "baseline_pred_de": f"{BASELINE}/pred_de.csv",
        "baseline_results": f"{BASELINE}/results.csv",
        "baseline_agg_results": f"{BASELINE}/agg_results.csv",
        "score": SCORE_FILE,
        "score_meaningful": MEANINGFUL_SCORE_FILE,
        "scoreboard_per_perturbation": SCOREBOARD_FILE,
        "scoreboard_figure": SCOREBOARD_FIGURE,
    }
    summary = {
        "cell_eval_version": cell_eval_version(),
        "profile": profile,
        "pert_col": pert_col,
        "control": control,
        "threads": threads,
        "perturbations": perturbations,
        "n_genes": int(real.n_vars),
        "n_cells": {PRED: int(pred.n_obs), REAL: int(real.n_obs), TRAIN: int(train.n_obs)},
        "headline": headline(kept.scores, shown, cell_eval_scores, kept.degenerate),
        "scores": kept.scores,
        "cell_eval_scores": cell_eval_scores,
        "degenerate": kept.degenerate,
        "restricted": kept.restricted,
        "metrics": metrics,
        "meaningful_metrics": {MODEL: kept.model, BASELINE: kept.baseline},
        "energy_distance": distances,
        "scoreboards": seed_boards,
        "files": files,
        "warnings": notes,
        "notes": {
            "normalization": "latentcell normalises every file: normalize_total 1e4, log1p",
            "baseline": "cell-eval build_base_mean_adata on train (mean of per-group means, "
            "control group included); real's labels and cell numbers; real's control cells",
            "ceiling": ceiling_method + "; null where cell-eval defines no ceiling",
            "ceiling_raw_half_depth": "uncorrected mean of the split-half scores",
            "scores": "cell-eval score_agg_metrics: model vs baseline, 0 = baseline level, on "
            "the metrics meaningful for this input (see degenerate, restricted); avg_score is "
            "their mean",
            "cell_eval_scores": "cell-eval's own scores over every metric both runs produced, "
            "degenerate ones included (a null or perfect baseline scores 0); its avg_score is "
            "headline.cell_eval_avg_score",
            "degenerate": "metric -> why it carries no information about the prediction for "
            "this input; left out of scores and avg_score",
            "restricted": "DE metrics averaged without the perturbations that have no "
            "significant real DE genes (the headline shows no ceiling for them: cell-eval's "
            "averages every perturbation; it stays under metrics)",
            "metrics": "cell-eval's aggregates as it computed them; meaningful_metrics: the "
            "means the scores use",
            "vcc_avg_score": f"mean score of {list(VCC_METRICS)} (the VCC overall score)",
            "scoreboards": "the seed designs' scoreboards (latentcell.evaluation.scoreboards), "
            "model and baseline through the same function: 003 in gene space (mean-shift "
            "Pearson r, top-K Jaccard of |shift|), 004 in the embedding named here (R² over "
            "perturbations x dims, MSE, energy distance, kNN purity); means over perturbations, "
            "each perturbation's values in scoreboard_per_perturbation.csv",
            "files": "relative to this folder",
        },
    }
    summary = to_jsonable(summary)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def cell_eval_version() -> str:
    from importlib.metadata import version

    return version("cell-eval")
