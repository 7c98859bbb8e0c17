"""The steps of ``latentcell benchmark trajectory``: cells cut into time bins, the bin
hold-out, the neighbour-bin baselines, the DiT's cells at the held-out cells' own times, and
one evaluation per (training seed, sampling seed). See ``trajectory`` for the protocol."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.benchmarks.generation_steps import Cells, HeldOutSplit
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.read_h5ad import read_h5ad
from latentcell.evaluation.protocol import check_counts

BIN_COL = "time_bin"  # the bin label every evaluated cell carries (the evaluator's condition)
BASELINE = "neighbour_bins"  # interpolation for the interior bin, persistence for the last


@dataclass(frozen=True)
class TimeBins:
    """The cells (time and bin label in obs), which bins are held out, and what role each
    held-out bin plays: ``{"bin05": "interior", "bin09": "last"}``."""

    cells: ad.AnnData
    time_col: str
    n_bins: int
    held_out: dict[str, str]
    edges: list[float]  # time range of every bin, [min, max] per bin in bin order


def bin_label(k: int) -> str:
    return f"bin{k:02d}"


def load_time_cells(path: str, time_col: str, n_bins: int) -> TimeBins:
    """The input h5ad, checked (a numeric, finite time column; raw counts), cut into
    ``n_bins`` equal-count bins of time (ties broken by row order, so the bins are exactly
    equal even where many cells share a time)."""
    adata = read_h5ad(path, "--data")
    if time_col not in adata.obs:
        raise DataValidationError(
            path, f"obs['{time_col}']", "missing",
            f"pass --time-col with a numeric obs column; have {list(adata.obs.columns)[:12]}",
        )  # fmt: skip
    try:
        times = adata.obs[time_col].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        times = np.array([np.nan])
    if not np.isfinite(times).all():
        raise DataValidationError(
            path, f"obs['{time_col}']", "not a finite number for every cell",
            "pass a numeric time column without NaN (or drop those cells)",
        )  # fmt: skip
    if adata.n_obs < 30 * n_bins:
        raise DataValidationError(
            path, "cells", f"{adata.n_obs} cells are too few for {n_bins} bins",
            f"pass at least {30 * n_bins} cells or fewer --bins",
        )  # fmt: skip
    check_counts(adata, path)
    rank = pd.Series(times).rank(method="first").to_numpy() - 1
    bins = (rank * n_bins // len(times)).astype(int)
    obs = pd.DataFrame(
        {time_col: times.astype(np.float32), BIN_COL: [bin_label(b) for b in bins]},
        index=adata.obs_names.astype(str),
    )
    obs[BIN_COL] = obs[BIN_COL].astype("category")
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = ad.AnnData(X=X, obs=obs, var=adata.var[[]].copy())
    edges = [[float(times[bins == b].min()), float(times[bins == b].max())] for b in range(n_bins)]
    held = {bin_label(n_bins // 2): "interior", bin_label(n_bins - 1): "last"}
    return TimeBins(cells, time_col, n_bins, held, edges)


def split_bins(bins: TimeBins, out: Path) -> HeldOutSplit:
    """Held-out bins out; the rest become the store the VAE and the DiT train on (its obs: the
    time, numeric, for the DiT, and the bin label, for the stratified validation split)."""
    from latentcell.data_pipelines.build import build_store

    held = bins.cells.obs[BIN_COL].astype(str).isin(list(bins.held_out)).to_numpy()
    train, heldout = bins.cells[~held].copy(), bins.cells[held].copy()
    store = out / "train.zarr"
    if not store.exists():
        h5ad = out / "train_cells.h5ad"
        train.write_h5ad(h5ad)
        build_store([h5ad], store, schema="generic")
        h5ad.unlink()
    cells = Cells(bins.cells, "", [BIN_COL], None)
    return HeldOutSplit(cells, train, heldout, store)


def dit_overrides(time_col: str) -> list[str]:
    """The DiT is conditioned on the time alone: no categorical condition (the bin label would
    name a held-out bin it never saw), the time as a continuous one."""
    return ["dit.model.conditions=[]", f"dit.model.continuous={time_col}"]


def neighbour_baseline(bins: TimeBins, split: HeldOutSplit, seed: int) -> ad.AnnData:
    """Real training cells standing in for each held-out bin, as many as it has cells:
    interior bin k -> half from bin k-1 and half from bin k+1 (interpolation by mixing the
    neighbours' cells); last bin -> the last training bin's cells (persistence: the latest
    state seen is the forecast). Drawn without replacement when the bin has enough cells."""
    rng = np.random.default_rng([seed, 7])
    train_bins = split.train.obs[BIN_COL].astype(str).to_numpy()
    parts = []
    for label, role in bins.held_out.items():
        k = int(label[3:])
        n = int((split.held.obs[BIN_COL].astype(str) == label).sum())
        sources = [k - 1, k + 1] if role == "interior" else [k - 1]
        shares = np.diff(np.linspace(0, n, len(sources) + 1).round().astype(int))
        for source, m in zip(sources, shares, strict=True):
            rows = np.flatnonzero(train_bins == bin_label(source))
            picked = rng.choice(rows, size=m, replace=m > len(rows))
            part = split.train[picked].copy()
            part.obs[BIN_COL] = label
            parts.append(part)
    out = ad.concat(parts, index_unique="-")
    out.obs[BIN_COL] = out.obs[BIN_COL].astype("category")
    return out


def generate_at_times(
    generator, time_col: str, times: np.ndarray, labels: np.ndarray, seed: int, args
) -> ad.AnnData:
    """One DiT cell per requested time (the held-out real cells' own times), decoded to counts
    through the generator's VAE and library model; obs: the time and the bin label."""
    from latentcell.models.conditions import ConditionRows

    space = generator.space
    n = len(times)
    codes = np.tile(np.asarray([len(v) for v in space.categories.values()], np.int64), (n, 1))
    raw = np.full((n, len(space.continuous)), np.nan, dtype=np.float32)
    raw[:, space.continuous.index(time_col)] = times
    rows = ConditionRows(codes, space.standardize(raw), np.full(n, -1, np.int64), {})
    z = generator.sample_latents(rows, args.steps, args.guidance, seed, "dit")
    X, library, _ = generator.decode(z, rows, seed)
    obs = pd.DataFrame(
        {time_col: times.astype(np.float32), BIN_COL: pd.Categorical(labels),
         "library_size": library},
        index=[f"gen-{i}" for i in range(n)],
    )  # fmt: skip
    adata = ad.AnnData(X=X, obs=obs, var=generator.var.copy())
    adata.obsm["X_latent"] = z.numpy().astype(np.float32)
    return adata


def evaluate_seed(
    args: argparse.Namespace, bins: TimeBins, split: HeldOutSplit, trained, seed: int
) -> dict:
    """One sampling seed: the DiT's cells at the held-out times and the neighbour-bin
    baseline, judged by ``evaluate_generation`` per held-out bin. Without ``train`` the
    evaluator cuts each bin's real cells into thirds: the reference, the real-vs-real ceiling
    and the PCA cells, so every method is scored against the same real third."""
    from latentcell.evaluation.generation import evaluate_generation

    held = split.held
    times = held.obs[bins.time_col].to_numpy(dtype=np.float32)
    labels = held.obs[BIN_COL].astype(str).to_numpy()
    gen = generate_at_times(trained.generator, bins.time_col, times, labels, seed, args)
    baseline = neighbour_baseline(bins, split, seed)
    folder = trained.dit_dir.parent / f"eval_seed{seed}"
    summary = evaluate_generation(
        gen, held, BIN_COL, baselines={BASELINE: baseline}, out_dir=folder
    )
    return {"sampling_seed": seed, "summary": summary}
