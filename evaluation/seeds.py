"""Several sampling seeds in one generated file: split by seed, score each, report mean ± sd.

``latentcell generate --seed 0,1,2`` writes every seed's cells into one h5ad with
``obs['sampling_seed']``. One seed's numbers move with the sampling noise (on Paul 2015 the
kNN AUC moves by ±0.03 between seeds), so ``evaluate_generation`` scores each seed's cells
separately against the same real cells and reports the spread. A file with one seed, or
without the column, is scored once, as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd

from latentcell.data_pipelines.errors import DataValidationError

SEED_COL = "sampling_seed"


def seed_groups(adata: ad.AnnData, source: str) -> dict[int | None, ad.AnnData]:
    """The cells of each sampling seed, in seed order; ``{None: adata}`` for one seed or none."""
    if SEED_COL not in adata.obs.columns:
        return {None: adata}
    seeds = pd.to_numeric(adata.obs[SEED_COL].astype(object), errors="coerce").to_numpy()
    if not (np.isfinite(seeds).all() and np.array_equal(seeds, np.round(seeds))):
        raise DataValidationError(
            source,
            f"obs['{SEED_COL}']",
            "must hold the integer seed each cell was sampled with",
            f"fix or drop obs['{SEED_COL}'] (latentcell generate writes it)",
        )
    values = np.unique(seeds)
    if len(values) < 2:
        return {None: adata}
    return {int(s): adata[seeds == s] for s in values}


def _flat(entry: Mapping) -> dict:
    """One replicate's headline numbers: macro and pooled metrics side by side."""
    return {**entry["macro"], **entry["pooled"]}


def _over_seeds(values: list[dict], reduce) -> dict[str, float]:
    """``reduce`` over seeds of every numeric key (nan entries ignored)."""
    keys = [k for k, v in values[0].items() if isinstance(v, (int, float, np.number))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan keys, one finite value
        return {k: float(reduce(np.array([v[k] for v in values], dtype=float))) for k in keys}


def _mean(values: list[dict]) -> dict[str, float]:
    return _over_seeds(values, np.nanmean)


def _sd(values: list[dict]) -> dict[str, float]:
    return _over_seeds(values, lambda a: np.nanstd(a, ddof=1))


def combine(replicates: Mapping[int | None, dict]) -> dict:
    """One method's entry (macro, pooled, per_condition) as the mean over its seeds; a
    condition not evaluated in some seed keeps the first seed's entry."""
    entries = list(replicates.values())
    if len(entries) == 1:
        return entries[0]
    per_condition = {}
    for cond, first in entries[0]["per_condition"].items():
        values = [e["per_condition"][cond] for e in entries]
        scored = all("not_evaluated" not in v for v in values)
        per_condition[cond] = _mean(values) if scored else first
    return {
        "macro": _mean([e["macro"] for e in entries]),
        "pooled": _mean([e["pooled"] for e in entries]),
        "per_condition": per_condition,
        "n_seeds": len(entries),
    }


def seed_report(replicates: Mapping[int, dict]) -> dict:
    """Mean, sample sd (ddof=1) and per-seed values of every headline metric."""
    flat = [_flat(e) for e in replicates.values()]
    return {
        "seeds": list(replicates),
        "mean": _mean(flat),
        "sd": _sd(flat),
        "per_seed": dict(replicates),
    }
