"""Which of cell-eval's metrics mean something for a given input, and the score over those.

Some metrics are degenerate for some inputs, and cell-eval scores them anyway: a value that
cannot depend on the prediction (or no value at all) enters ``avg_score`` as a score of 0.
``evaluate_perturbation`` lists them with the reason and scores the model on the rest; cell-eval's
own ``avg_score`` stays beside it, labelled. Degenerate here means:

- by construction of the input (known before cell-eval runs):
  - one perturbation: ``discrimination_score_*`` ranks the true perturbation among one, so it
    is 1 for every method; ``clustering_agreement`` has one centroid per side to cluster;
  - fewer than 3 perturbations: ``pearson_edistance`` and ``de_spearman_sig`` are
    correlations ACROSS perturbations (of 1 or 2 points: undefined or +-1);
- a perturbation with no significant real DE gene (FDR < 0.05): every per-perturbation DE
  metric (``overlap_at_*``, ``precision_at_*``, ``de_*``, ``pr_auc``, ``roc_auc``) is 0 or
  NaN there whatever the prediction, so those metrics are averaged over the other
  perturbations ("restricted"), and dropped when no perturbation has real DE genes;
- a metric cell-eval raised on for the baseline (it logs the error and drops the metric); one
  it raised on for the model only is the prediction's failure and scores 0;
- a metric whose score is undefined: the baseline has no value (null/NaN), or already has the
  best value (``(u - b) / (1 - b)`` with b = 1, ``1 - u / b`` with b = 0); cell-eval counts
  those as 0 whatever the model does. A model WITHOUT a value where the baseline has one is
  not degenerate: that is the model's failure, and it scores 0, as in cell-eval.

cell-eval logs "Error computing metric 'X': ..." for metrics that cannot be computed on the
input; ``CellEvalErrors`` records every such error and silences only those of the metrics
already known to be degenerate by construction, so any other error still prints.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FDR = 0.05  # cell-eval's significance threshold for DE genes
CELL_EVAL_LOGGER = "cell_eval._pipeline._runner"  # where MetricPipeline logs metric errors
_ERROR = re.compile(r"Error computing metric '([^']+)': (.*)", re.S)
CROSS_PERTURBATION = ("pearson_edistance", "de_spearman_sig")
DISCRIMINATION = (
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
)


def is_de_metric(name: str) -> bool:
    return name.startswith(("overlap_at_", "precision_at_", "de_")) or name in ("pr_auc", "roc_auc")


def per_perturbation_de(name: str) -> bool:
    """DE metrics valued per perturbation (``de_spearman_sig`` is one value across them;
    ``de_nsig_counts_*`` are counts, not scored)."""
    return is_de_metric(name) and name != "de_spearman_sig" and not name.startswith("de_nsig")


def by_construction(n_perturbations: int) -> dict[str, str]:
    """Metric -> reason, for the metrics degenerate for ``n_perturbations`` (module docstring)."""
    out = {}
    if n_perturbations == 1:
        reason = "one perturbation: the true one ranks first among one, so 1 for every method"
        out.update(dict.fromkeys(DISCRIMINATION, reason))
        out["clustering_agreement"] = "one perturbation: one centroid per side, nothing to cluster"
    if n_perturbations < 3:
        out.update(
            dict.fromkeys(
                CROSS_PERTURBATION,
                f"a correlation across perturbations, over {n_perturbations} of them "
                "(needs 3 or more)",
            )
        )
    return out


class CellEvalErrors(logging.Filter):
    """While entered, records cell-eval's per-metric errors (``errors``: metric -> message)
    and drops the log lines of those in ``expected`` only; every other error still prints."""

    def __init__(self, expected) -> None:
        super().__init__()
        self.expected = set(expected)
        self.errors: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = _ERROR.match(record.getMessage()) if record.levelno >= logging.ERROR else None
        if match is None:
            return True
        self.errors.setdefault(match.group(1), match.group(2).strip())
        return match.group(1) not in self.expected

    def __enter__(self) -> CellEvalErrors:
        logging.getLogger(CELL_EVAL_LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(CELL_EVAL_LOGGER).removeFilter(self)


def real_de_counts(path: Path, perturbations) -> dict[str, int]:
    """Perturbation -> number of significant real DE genes, from cell-eval's ``real_de.csv``
    (empty when there is none, e.g. a profile without DE)."""
    import polars as pl

    if not Path(path).is_file():
        return {}
    table = pl.read_csv(path, columns=["target", "fdr"])
    counts = table.filter(pl.col("fdr") < FDR).group_by("target").len()
    found = dict(zip(counts["target"].cast(str).to_list(), counts["len"].to_list(), strict=True))
    return {p: int(found.get(p, 0)) for p in perturbations}


@dataclass
class Meaningful:
    """The scores over the meaningful metrics, and why the others were left out."""

    scores: dict  # metric -> score against the baseline, and avg_score
    model: dict  # metric -> the model's mean over the perturbations kept
    baseline: dict
    degenerate: dict  # metric -> reason
    restricted: dict = field(default_factory=dict)  # metrics, perturbations_left_out, reason


def _mean(values: list) -> float | None:
    """Mean as cell-eval's ``describe`` takes it: nulls skipped, a NaN makes it null."""
    values = [v for v in values if v is not None]
    if not values or any(np.isnan(v) for v in values):
        return None
    return float(np.mean(values))


def meaningful_scores(
    cell_eval, model_results, base_results, degenerate: dict, de_counts: dict, path: Path
) -> Meaningful:
    """Score the model against the baseline (``score_agg_metrics``, written to ``path``) on
    the metrics not in ``degenerate`` (metric -> reason, extended here with DE metrics and
    undefined scores), per-perturbation DE metrics restricted to perturbations with real DE
    genes (``de_counts``)."""
    import polars as pl
    from cell_eval.metrics import metrics_registry

    degenerate = dict(degenerate)
    without_de = sorted(p for p, n in de_counts.items() if n == 0)
    all_without = bool(de_counts) and len(without_de) == len(de_counts)
    model_rows = {r["perturbation"]: r for r in model_results.to_dicts()}
    base_rows = {r["perturbation"]: r for r in base_results.to_dicts()}
    columns = [c for c in base_results.columns if c != "perturbation"]  # the model's may lack one
    model, baseline = {}, {}
    restricted: list[str] = []
    for metric in columns:
        try:
            best_value = str(metrics_registry.get_metric(metric).best_value.name)
        except (KeyError, AttributeError):
            continue  # not scored by cell-eval either (de_nsig_counts_*)
        if best_value not in ("ONE", "ZERO") or metric in degenerate:
            continue
        if per_perturbation_de(metric) and all_without:
            degenerate[metric] = f"no perturbation has significant real DE genes (FDR < {FDR})"
            continue
        keep = [p for p in model_rows if not (per_perturbation_de(metric) and p in without_de)]
        u = _mean([model_rows[p].get(metric) for p in keep])
        b = _mean([base_rows[p].get(metric) for p in keep if p in base_rows])
        if b is None:
            degenerate[metric] = "the training-mean baseline has no value (null), so no score"
            continue
        if b == (1.0 if best_value == "ONE" else 0.0):
            degenerate[metric] = f"the baseline already has the best value ({b:g}): no score"
            continue
        model[metric], baseline[metric] = u, b
        if len(keep) < len(model_rows):
            restricted.append(metric)
    names = list(model)
    scores: dict = {"avg_score": None}
    if not names:  # nothing meaningful to score: the file says so
        pl.DataFrame({"metric": ["avg_score"], "from_baseline": [None]}).write_csv(path)
    else:
        frame = {"statistic": ["mean"]}
        nan = float("nan")  # a model without a value scores 0, as in cell-eval
        user = pl.DataFrame(
            {**frame, **{n: [nan if model[n] is None else model[n]] for n in names}}
        )
        base = pl.DataFrame({**frame, **{n: [baseline[n]] for n in names}})
        table = cell_eval.score_agg_metrics(user, base, output=str(path))
        scores = dict(zip(table["metric"].to_list(), table["from_baseline"].to_list(), strict=True))
    kept = {}
    if restricted:
        kept = {
            "metrics": restricted,
            "perturbations_left_out": without_de,
            "reason": f"no significant real DE genes (FDR < {FDR}): the DE metrics are 0 or "
            "NaN there whatever the prediction; averaged over the other perturbations",
        }
    return Meaningful(scores, model, baseline, degenerate, kept)
