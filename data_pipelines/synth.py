"""Synthetic single-cell count data with known ground truth (``latentcell data synth``).

Why: tests, benchmarks and model checks need files shaped like the real inputs (the Virtual Cell
Challenge training file, scBaseCount samples) at any size, with effects whose true values are
known so that a pipeline or a model can be checked against them.

Generative model (all draws with numpy from ``seed``; G genes, d = ``latent_dim``):

* Genes: baseline log-rates ``b_g`` laid on a normal quantile grid with sd ``baseline_scale``
  (shuffled), the top ``1 - baseline_clip_quantile`` clipped so no single gene dominates;
  loadings ``W_g ~ N(0, loading_scale^2 / d)``; NB inverse dispersion
  ``theta_g ~ LogNormal(log(theta_median), theta_log_sd)``, so ``Var = mu + mu^2 / theta``.
* Cell types: centers ``c_t ~ N(0, cell_type_scale^2 I_d)``.
* Batches: cells are batch-major (batch k is a contiguous row range, sizes ~ Dirichlet);
  per-batch per-gene log-fold effects ``beta_kg ~ N(0, batch_effect_scale^2)``, per-batch
  library shift ``N(0, batch_library_scale^2)`` and cell-type composition ``Dirichlet(1)``.
* Perturbations (vcc schema only): each targets one gene among the most expressed, has a latent
  shift shared by every cell type ``delta_p ~ N(0, pert_shift_scale^2 I_d)``, a part specific
  to each cell type ``gamma_pt ~ N(0, pert_type_scale^2 I_d)`` (drawn from a stream of its
  own, so a scale of 0, the default, leaves every other parameter and cell as before) and a
  knockdown factor ``k_p ~ U(knockdown_range)``. With ``pert_type_scale > 0`` a held-out cell
  type has a true response that is neither "no response" nor the other types' response. A cell is a control (``non-targeting``) with probability
  ``control_fraction``, else perturbed by a uniform choice among the perturbations.
* Cell i (type t, batch k, perturbation p or none):
  ``z_i = c_t + cell_noise_scale * eps_i (+ delta_p + gamma_pt)``;
  ``eta_ig = W_g . z_i + b_g + beta_kg (+ log k_p if g is p's target)``;
  ``L_i = exp(log(library_median) + shift_k + library_log_sd * N(0, 1))``;
  ``mu_ig = L_i * softmax_g(eta_i)``; ``X_ig ~ NegBinomial(mean mu_ig, theta_g)``.

The defaults give about 10% non-zero entries at 2000 genes and a median of about 2,500 UMIs.
Counts are drawn in fixed blocks of ``RNG_BLOCK_CELLS`` cells, each with its own random stream,
and streamed to disk through ``H5adStreamWriter``: the output is the same for any
``chunk_cells`` and memory stays flat for millions of cells. The ground truth is written to
``uns['latentcell_synth']``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .h5ad_stream_writer import (
    COMPRESSIONS,
    H5adStreamWriter,
    temporary_sibling,
)

SCHEMAS = ("vcc", "scbasecount")
CONTROL_LABEL = "non-targeting"
GENERATOR_VERSION = 2  # 2: cell-type-specific perturbation responses (gamma_pt)
RNG_BLOCK_CELLS = 1024  # cells per independent random stream; fixes output across chunk sizes
INVERSION_MAX_MEAN = 20.0  # NB means up to this are drawn by CDF inversion, larger by gamma-Poisson
INVERSION_MAX_STEPS = 100_000
TARGET_POOL_FRACTION = 0.1  # perturbation targets come from this top fraction of genes
# Real Cell Ontology terms for the first cell types; further ones are generic.
CELL_TYPES = (
    ("T cell", "CL:0000084"),
    ("B cell", "CL:0000236"),
    ("monocyte", "CL:0000576"),
    ("natural killer cell", "CL:0000623"),
    ("fibroblast", "CL:0000057"),
    ("endothelial cell", "CL:0000115"),
    ("epithelial cell", "CL:0000066"),
    ("macrophage", "CL:0000235"),
    ("hepatocyte", "CL:0000182"),
    ("neuron", "CL:0000540"),
    ("erythrocyte", "CL:0000232"),
    ("dendritic cell", "CL:0000451"),
)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic data set; same config, same file content."""

    schema: str = "vcc"
    n_cells: int = 10_000
    n_genes: int = 2000
    n_perturbations: int = 50
    n_cell_types: int = 1
    n_batches: int = 4
    seed: int = 0
    latent_dim: int = 10
    chunk_cells: int = 8 * RNG_BLOCK_CELLS
    split_samples: bool = False
    gene_drop_fraction: float = 0.05
    control_fraction: float = 0.15
    guides_per_target: int = 2
    knockdown_range: tuple[float, float] = (0.1, 0.3)
    library_median: float = 2500.0
    library_log_sd: float = 0.4
    baseline_scale: float = 3.75
    baseline_clip_quantile: float = 0.99
    loading_scale: float = 1.0
    cell_type_scale: float = 1.0
    cell_noise_scale: float = 0.5
    pert_shift_scale: float = 0.5
    pert_type_scale: float = 0.0
    batch_effect_scale: float = 0.25
    batch_library_scale: float = 0.15
    theta_median: float = 1.0
    theta_log_sd: float = 0.5
    compression: str = "gzip"

    def __post_init__(self):
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid synthetic data config: " + "; ".join(problems))

    @property
    def has_perturbations(self) -> bool:
        return self.schema == "vcc" and self.n_perturbations > 0


def _config_problems(c: SynthConfig) -> list[str]:
    """Every violated constraint, so the user fixes them in one go."""
    checks = [
        (c.schema in SCHEMAS, f"schema must be one of {SCHEMAS}, not {c.schema!r}"),
        (c.n_cells >= 1 and c.n_genes >= 2, "n_cells must be >= 1 and n_genes >= 2"),
        (c.n_batches >= 1 and c.n_cell_types >= 1, "n_batches and n_cell_types must be >= 1"),
        (c.n_cells >= c.n_batches, "n_cells must be >= n_batches (no empty batch)"),
        (0 <= c.n_perturbations <= c.n_genes, "n_perturbations must be in [0, n_genes]"),
        (c.latent_dim >= 1 and c.chunk_cells >= 1, "latent_dim and chunk_cells must be >= 1"),
        (0 <= c.control_fraction <= 1, "control_fraction must be in [0, 1]"),
        (c.guides_per_target >= 1, "guides_per_target must be >= 1"),
        (0 < min(c.knockdown_range) <= max(c.knockdown_range) <= 1, "knockdown in (0, 1]"),
        (c.pert_type_scale >= 0, "pert_type_scale must be >= 0"),
        (0 <= c.gene_drop_fraction < 1, "gene_drop_fraction must be in [0, 1)"),
        (c.compression in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}"),
        (not c.split_samples or c.schema == "scbasecount", "split_samples needs scbasecount"),
    ]
    return [message for ok, message in checks if not ok]


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class GroundTruth:
    """The true parameters of the generative model (see the module docstring)."""

    gene_symbols: np.ndarray  # (G,) str
    gene_ids: np.ndarray  # (G,) str, Ensembl-like
    baseline: np.ndarray  # (G,) b_g
    loadings: np.ndarray  # (G, d) W
    theta: np.ndarray  # (G,) NB inverse dispersion
    cell_type_names: list[str]
    cell_type_ontology: list[str]
    cell_type_centers: np.ndarray  # (T, d)
    batch_names: list[str]
    batch_sizes: np.ndarray  # (B,) cells per batch, rows are batch-major
    batch_effects: np.ndarray  # (B, G) log-fold
    batch_library_shift: np.ndarray  # (B,) log library shift
    cell_type_probs: np.ndarray  # (B, T)
    perturbation_names: list[str]  # target gene symbols
    perturbation_targets: np.ndarray  # (P,) gene index
    perturbation_shifts: np.ndarray  # (P, d) shared by every cell type
    perturbation_type_shifts: np.ndarray  # (P, T, d) specific to each cell type
    knockdown: np.ndarray  # (P,) rate multiplier of the target gene
    sample_gene_masks: np.ndarray  # (B, G) bool: genes kept in each split sample

    @cached_property
    def gene_offsets32(self) -> np.ndarray:
        """(B, G) float32 baseline + batch effect: added to every cell's log-rates."""
        return (self.baseline + self.batch_effects).astype(np.float32)

    @cached_property
    def loadings32(self) -> np.ndarray:
        return self.loadings.astype(np.float32)

    @property
    def batch_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.batch_sizes)])

    def guide_names(self, guides: int) -> list[str]:
        """Guide ids; a cell's code is ``(p + 1) * guides + g`` (p = -1 for controls)."""
        labels = [CONTROL_LABEL, *self.perturbation_names]
        return [f"{name}_g{g + 1}" for name in labels for g in range(guides)]

    def to_uns(self, config: SynthConfig) -> dict:
        """Plain arrays, lists and scalars that ``anndata.io.write_elem`` can store."""
        out = {k: _plain(v) for k, v in asdict(self).items() if k != "sample_gene_masks"}
        out["config"] = {k: _plain(v) for k, v in asdict(config).items()}
        out["control_label"] = CONTROL_LABEL
        out["generator_version"] = GENERATOR_VERSION
        out["rng_block_cells"] = RNG_BLOCK_CELLS
        return out


def _plain(value):
    """Lists of strings become string arrays; tuples become arrays (anndata writes both)."""
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=str if not value or isinstance(value[0], str) else None)
    return value


def make_ground_truth(config: SynthConfig) -> GroundTruth:
    """Draw all model parameters from the seed's own stream (independent of the cells)."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    g, d, b = config.n_genes, config.latent_dim, config.n_batches
    baseline = _gene_baselines(config, rng)
    targets, shifts, knockdown = _perturbations(config, baseline, rng)
    symbols = np.array([f"GENE{i + 1:05d}" for i in range(g)])
    names, ontology = _cell_type_labels(config.n_cell_types)
    return GroundTruth(
        gene_symbols=symbols,
        gene_ids=np.array([f"ENSG{90_000_000_000 + i + 1}" for i in range(g)]),
        baseline=baseline,
        loadings=rng.normal(0.0, config.loading_scale / np.sqrt(d), (g, d)),
        theta=np.exp(rng.normal(np.log(config.theta_median), config.theta_log_sd, g)),
        cell_type_names=names,
        cell_type_ontology=ontology,
        cell_type_centers=rng.normal(0.0, config.cell_type_scale, (config.n_cell_types, d)),
        batch_names=_batch_names(config),
        batch_sizes=_batch_sizes(config, rng),
        batch_effects=rng.normal(0.0, config.batch_effect_scale, (b, g)),
        batch_library_shift=rng.normal(0.0, config.batch_library_scale, b),
        cell_type_probs=rng.dirichlet(np.ones(config.n_cell_types), b),
        perturbation_names=[str(s) for s in symbols[targets]],
        perturbation_targets=targets,
        perturbation_shifts=shifts,
        perturbation_type_shifts=_type_shifts(config, len(targets)),
        knockdown=knockdown,
        sample_gene_masks=_sample_gene_masks(config, rng),
    )


def _type_shifts(config: SynthConfig, n_perturbations: int) -> np.ndarray:
    """gamma_pt from its own stream: the other parameters do not depend on whether it is drawn."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2,)))
    shape = (n_perturbations, config.n_cell_types, config.latent_dim)
    return config.pert_type_scale * rng.standard_normal(shape)


def _gene_baselines(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Log-normal-like gene means on a quantile grid: stable density, no runaway top gene."""
    q = (np.arange(config.n_genes) + 0.5) / config.n_genes
    z = np.minimum(stats.norm.ppf(q), stats.norm.ppf(config.baseline_clip_quantile))
    return rng.permutation(config.baseline_scale * z)


def _perturbations(config: SynthConfig, baseline: np.ndarray, rng: np.random.Generator):
    """Targets among expressed genes (as in real CRISPRi screens), shifts and knockdowns."""
    p = config.n_perturbations if config.has_perturbations else 0
    pool = max(p, int(np.ceil(TARGET_POOL_FRACTION * config.n_genes)))
    expressed = np.argsort(-baseline, kind="stable")[:pool]
    targets = np.sort(rng.choice(expressed, size=p, replace=False)).astype(np.int64)
    shifts = rng.normal(0.0, config.pert_shift_scale, (p, config.latent_dim))
    knockdown = rng.uniform(*config.knockdown_range, size=p)
    return targets, shifts, knockdown


def _batch_sizes(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """At least one cell per batch, the rest split by Dirichlet proportions."""
    props = rng.dirichlet(np.full(config.n_batches, 5.0))
    extra = rng.multinomial(config.n_cells - config.n_batches, props)
    return (extra + 1).astype(np.int64)


def _sample_gene_masks(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Each split sample loses a different random set of genes (real samples differ too)."""
    n_drop = int(round(config.gene_drop_fraction * config.n_genes))
    masks = np.ones((config.n_batches, config.n_genes), dtype=bool)
    for mask in masks:
        mask[rng.choice(config.n_genes, size=n_drop, replace=False)] = False
    return masks


def _cell_type_labels(n: int) -> tuple[list[str], list[str]]:
    """Real names and CL terms while they last, then generic names under CL:0000000 (cell)."""
    named = list(CELL_TYPES[:n])
    generic = [(f"cell type {i + 1}", "CL:0000000") for i in range(len(named), n)]
    pairs = named + generic
    return [name for name, _ in pairs], [term for _, term in pairs]


def _batch_names(config: SynthConfig) -> list[str]:
    if config.schema == "scbasecount":
        return [f"SRX{20_000_001 + k}" for k in range(config.n_batches)]
    return [f"batch_{k + 1:02d}" for k in range(config.n_batches)]


# ----------------------------------------------------------------------------- cells


@dataclass
class SynthCells:
    """Consecutive simulated cells: counts plus the codes their obs columns are built from."""

    X: sp.csr_matrix  # (n, G) float32 integer counts
    rows: np.ndarray  # (n,) int64 global row
    batch: np.ndarray  # (n,) int32
    cell_type: np.ndarray  # (n,) int32
    perturbation: np.ndarray  # (n,) int32, -1 = control
    guide: np.ndarray  # (n,) int32 into GroundTruth.guide_names

    @staticmethod
    def concat(parts: list[SynthCells]) -> SynthCells:
        if len(parts) == 1:
            return parts[0]
        arrays = {k: np.concatenate([getattr(p, k) for p in parts]) for k in _CODE_FIELDS}
        return SynthCells(X=sp.vstack([p.X for p in parts], format="csr"), **arrays)

    def take(self, start: int, stop: int) -> SynthCells:
        arrays = {k: getattr(self, k)[start:stop] for k in _CODE_FIELDS}
        return SynthCells(X=self.X[start:stop], **arrays)


_CODE_FIELDS = ("rows", "batch", "cell_type", "perturbation", "guide")


def simulate_rows(truth: GroundTruth, config: SynthConfig, start: int, stop: int) -> SynthCells:
    """Cells [start, stop); ``start`` must be a multiple of ``RNG_BLOCK_CELLS``."""
    if start % RNG_BLOCK_CELLS:
        raise ValueError(f"start {start} is not a multiple of {RNG_BLOCK_CELLS}")
    stop = min(stop, config.n_cells)
    first, last = start // RNG_BLOCK_CELLS, -(-stop // RNG_BLOCK_CELLS)
    return SynthCells.concat([simulate_block(truth, config, k) for k in range(first, last)])


def simulate_block(truth: GroundTruth, config: SynthConfig, block: int) -> SynthCells:
    """One RNG block of cells, drawn from its own stream so chunking cannot change it."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, block)))
    rows = np.arange(block * RNG_BLOCK_CELLS, min((block + 1) * RNG_BLOCK_CELLS, config.n_cells))
    batch = (np.searchsorted(truth.batch_starts, rows, side="right") - 1).astype(np.int32)
    cell_type = _draw_cell_types(truth.cell_type_probs[batch], rng)
    perturbation, guide = _draw_perturbations(config, truth, len(rows), rng)
    log_rates = _log_rates(config, truth, batch, cell_type, perturbation, rng)
    library = np.exp(
        np.log(config.library_median)
        + truth.batch_library_shift[batch]
        + config.library_log_sd * rng.standard_normal(len(rows))
    )
    mu = _softmax_(log_rates)
    mu *= library[:, None].astype(np.float32)
    X = sample_negative_binomial(mu, truth.theta, rng)
    return SynthCells(X, rows, batch, cell_type, perturbation, guide)


def _draw_cell_types(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverse-CDF draw per cell from its batch's cell-type composition."""
    u = rng.random(len(probs))
    codes = (np.cumsum(probs, axis=1) < u[:, None]).sum(axis=1)
    return np.minimum(codes, probs.shape[1] - 1).astype(np.int32)


def _draw_perturbations(config: SynthConfig, truth: GroundTruth, n: int, rng):
    """Perturbation code (-1 = control) and guide code per cell."""
    n_pert = len(truth.perturbation_names)
    control = rng.random(n) < config.control_fraction
    pert = rng.integers(0, max(n_pert, 1), n)
    pert = np.where(control | (n_pert == 0), -1, pert).astype(np.int32)
    guide = (pert + 1) * config.guides_per_target + rng.integers(0, config.guides_per_target, n)
    return pert, guide.astype(np.int32)


def _log_rates(config, truth, batch, cell_type, perturbation, rng) -> np.ndarray:
    """eta = W z + baseline + batch effect (float32), with each target gene's knockdown."""
    n = len(batch)
    z = truth.cell_type_centers[cell_type] + config.cell_noise_scale * rng.standard_normal(
        (n, config.latent_dim)
    )
    perturbed = np.flatnonzero(perturbation >= 0)
    p = perturbation[perturbed]
    z[perturbed] += (
        truth.perturbation_shifts[p] + truth.perturbation_type_shifts[p, cell_type[perturbed]]
    )
    eta = z.astype(np.float32) @ truth.loadings32.T
    eta += truth.gene_offsets32[batch]
    targets = truth.perturbation_targets[perturbation[perturbed]]
    eta[perturbed, targets] += np.log(truth.knockdown[perturbation[perturbed]]).astype(np.float32)
    return eta


def _softmax_(eta: np.ndarray) -> np.ndarray:
    """Row softmax computed in place (the (cells, genes) array is the largest one we make)."""
    eta -= eta.max(axis=1, keepdims=True)
    np.exp(eta, out=eta)
    eta /= eta.sum(axis=1, keepdims=True)
    return eta


# ----------------------------------------------------------------------------- NB sampling


def sample_negative_binomial(
    mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """NB(mean mu, per-gene inverse dispersion theta (G,)) draws for (cells, G) means, as CSR.

    Why not ``rng.negative_binomial``: a gamma and a Poisson draw for each of billions of
    entries, 90% of which are zero. Here one float32 uniform per entry decides zero vs
    non-zero against ``P(X=0)`` (exact up to float32 rounding, ~1e-7); only the non-zero
    entries are resolved further, in float64.
    """
    mu = np.asarray(mu, dtype=np.float32)
    theta32 = np.asarray(theta, dtype=np.float32)
    u = rng.random(mu.shape, dtype=np.float32)
    p0 = mu / theta32
    np.log1p(p0, out=p0)
    p0 *= -theta32
    np.exp(p0, out=p0)
    flat = np.flatnonzero(u > p0)
    cols = flat % mu.shape[1]
    m, t = mu.ravel()[flat].astype(np.float64), np.asarray(theta, dtype=np.float64)[cols]
    values = np.empty(flat.size, dtype=np.float32)
    small = m <= INVERSION_MAX_MEAN
    u_small = u.ravel()[flat[small]].astype(np.float64)
    values[small] = _nb_by_inversion(m[small], t[small], u_small)
    values[~small] = _nb_nonzero_by_rejection(m[~small], t[~small], rng)
    return _flat_to_csr(flat, cols, values, mu.shape)


def _nb_by_inversion(mu, theta, u) -> np.ndarray:
    """Walk the CDF from P(X=0) until it reaches u; work is proportional to the counts.

    Finished entries get ``u = inf`` and are compacted away only once half the arrays are
    finished, so the bookkeeping stays a small fraction of the arithmetic.
    """
    out = np.zeros(mu.size, dtype=np.float32)
    idx = np.arange(mu.size)
    q, theta_m1 = mu / (mu + theta), theta - 1.0
    pk = np.exp(-theta * np.log1p(mu / theta))
    cdf, u, k, n_live = pk.copy(), u.copy(), 0, idx.size
    while n_live:
        k += 1
        pk *= q * ((k + theta_m1) / k)
        cdf += pk
        done = u <= cdf
        if k >= INVERSION_MAX_STEPS:  # float round-off guard, never reached in practice
            done |= u <= 1.0
        out[idx[done]] = k
        u[done] = np.inf
        n_live -= int(np.count_nonzero(done))
        if n_live <= idx.size // 2:
            keep = np.isfinite(u)
            idx, q, theta_m1, u, pk, cdf = (a[keep] for a in (idx, q, theta_m1, u, pk, cdf))
    return out


def _nb_nonzero_by_rejection(mu, theta, rng: np.random.Generator) -> np.ndarray:
    """NB conditioned on X > 0 via gamma-Poisson redraws (P(X=0) is small for large means)."""
    out = np.zeros(mu.size, dtype=np.float32)
    todo = np.arange(mu.size)
    while todo.size:
        draw = rng.poisson(rng.gamma(theta[todo], mu[todo] / theta[todo]))
        out[todo] = draw
        todo = todo[draw == 0]
    return out


def _flat_to_csr(flat, cols, values, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR from sorted row-major flat indices without materialising a dense count matrix."""
    rows = flat // shape[1]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=shape)


# ----------------------------------------------------------------------------- obs / var


def barcodes(rows: np.ndarray) -> np.ndarray:
    """Unique 16-nt barcodes: a bijective 32-bit hash of the row id, written in base 4."""
    x = (rows.astype(np.uint64) + np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF)
    for shift, mult in ((16, 0x45D9F3B), (16, 0x45D9F3B), (16, 1)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult) & np.uint64(0xFFFFFFFF)
    digits = (x[:, None] >> (2 * np.arange(16, dtype=np.uint64))) & np.uint64(3)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits.astype(np.intp)]
    return np.ascontiguousarray(letters).view("S16").ravel().astype(str)


def obs_frame(config: SynthConfig, truth: GroundTruth, cells: SynthCells) -> pd.DataFrame:
    """The schema's obs columns for ``cells`` (counts-derived columns from ``cells.X``)."""
    batch = pd.Categorical.from_codes(cells.batch, truth.batch_names)
    cell_type = pd.Categorical.from_codes(cells.cell_type, truth.cell_type_names)
    if config.schema == "vcc":
        names = [CONTROL_LABEL, *truth.perturbation_names]
        guides = truth.guide_names(config.guides_per_target)
        columns = {
            "target_gene": pd.Categorical.from_codes(cells.perturbation + 1, names),
            "guide_id": pd.Categorical.from_codes(cells.guide, guides),
            "batch": batch,
            "cell_type": cell_type,
        }
        index = np.char.add(np.char.add(barcodes(cells.rows), "-"), batch.astype(str))
    else:
        terms = np.asarray(truth.cell_type_ontology)
        ontology = pd.Categorical(terms[cells.cell_type], categories=pd.unique(terms))
        columns = {
            "gene_count_Unique": np.diff(cells.X.indptr).astype(np.int64),
            "umi_count_Unique": np.asarray(cells.X.sum(axis=1)).ravel().astype(np.int64),
            "SRX_accession": batch,
            "cell_type": cell_type,
            "cell_ontology_term_id": ontology,
        }
        index = barcodes(cells.rows)
    return pd.DataFrame(columns, index=pd.Index(index.astype(object)))


def var_frame(config: SynthConfig, truth: GroundTruth, keep: np.ndarray | None = None):
    """VCC: symbols index + ``gene_id``; scBaseCount: Ensembl index + ``gene_symbols``."""
    symbols, ids = truth.gene_symbols, truth.gene_ids
    if keep is not None:
        symbols, ids = symbols[keep], ids[keep]
    if config.schema == "vcc":
        return pd.DataFrame({"gene_id": ids.astype(object)}, index=pd.Index(symbols.astype(object)))
    return pd.DataFrame(
        {"gene_symbols": symbols.astype(object)}, index=pd.Index(ids.astype(object))
    )


def uns_dict(config: SynthConfig, truth: GroundTruth) -> dict:
    source = (
        f"latentcell synthetic data (schema={config.schema}, seed={config.seed}, "
        f"generator v{GENERATOR_VERSION}); ground truth in uns['latentcell_synth']"
    )
    return {"source": source, "latentcell_synth": truth.to_uns(config)}


# ----------------------------------------------------------------------------- writing


def chunk_ranges(config: SynthConfig):
    """Row ranges of at least ``chunk_cells`` cells, aligned to RNG blocks."""
    step = -(-config.chunk_cells // RNG_BLOCK_CELLS) * RNG_BLOCK_CELLS
    for start in range(0, config.n_cells, step):
        yield start, min(start + step, config.n_cells)


def synthesize(config: SynthConfig, out_path: str | os.PathLike) -> Path:
    """Write the data set: one ``.h5ad`` file, or a directory of per-sample files."""
    out = Path(out_path)
    truth = make_ground_truth(config)
    if config.split_samples:
        return _write_split(config, truth, out)
    return _write_single(config, truth, out)


def _write_single(config: SynthConfig, truth: GroundTruth, out: Path) -> Path:
    """All cells in one file; obs parts are small and kept until close."""
    parts: list[pd.DataFrame] = []
    with _open_writer(out, config) as writer:
        for start, stop in chunk_ranges(config):
            cells = simulate_rows(truth, config, start, stop)
            writer.append(cells.X)
            parts.append(obs_frame(config, truth, cells))
        return writer.close(_concat_obs(parts), var_frame(config, truth), uns_dict(config, truth))


def _concat_obs(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate keeping categoricals (all parts share the same categories)."""
    return pd.concat(parts) if len(parts) > 1 else parts[0]


def _write_split(config: SynthConfig, truth: GroundTruth, out: Path) -> Path:
    """One file per SRX accession in a directory published by a single rename."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; remove it or pick --out")
    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)
    try:
        _write_samples(config, truth, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_samples(config: SynthConfig, truth: GroundTruth, folder: Path) -> None:
    """Batch-major rows: each chunk feeds the samples whose row ranges it overlaps."""
    starts = truth.batch_starts
    samples = [_SampleSink(config, truth, folder, k) for k in range(config.n_batches)]
    try:
        for start, stop in chunk_ranges(config):
            cells = simulate_rows(truth, config, start, stop)
            for k in np.unique(cells.batch):
                lo, hi = max(starts[k], start) - start, min(starts[k + 1], stop) - start
                samples[k].append(cells.take(lo, hi))
                if starts[k + 1] <= stop:
                    samples[k].close()
        if not all(sample.closed for sample in samples):
            raise RuntimeError("internal error: a split sample was never completed")
    finally:
        for sample in samples:
            sample.abort()


class _SampleSink:
    """The writer of one split sample; opened on its first cells, gene subset applied."""

    def __init__(self, config: SynthConfig, truth: GroundTruth, folder: Path, k: int):
        self.config, self.truth, self.k = config, truth, k
        self.path = folder / f"{truth.batch_names[k]}.h5ad"
        self.keep = np.flatnonzero(truth.sample_gene_masks[k])
        self.writer: H5adStreamWriter | None = None
        self.parts: list[pd.DataFrame] = []
        self.closed = False

    def append(self, cells: SynthCells) -> None:
        if self.writer is None:
            self.writer = _open_writer(self.path, self.config, n_genes=self.keep.size)
        cells.X = cells.X[:, self.keep]
        self.writer.append(cells.X)
        self.parts.append(obs_frame(self.config, self.truth, cells))

    def close(self) -> None:
        var = var_frame(self.config, self.truth, self.keep)
        self.writer.close(_concat_obs(self.parts), var, uns_dict(self.config, self.truth))
        self.writer, self.parts, self.closed = None, [], True

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _open_writer(path: Path, config: SynthConfig, n_genes: int | None = None) -> H5adStreamWriter:
    level = 1 if config.compression == "gzip" else None
    return H5adStreamWriter(
        path, n_genes or config.n_genes, compression=config.compression, compression_level=level
    )


# ----------------------------------------------------------------------------- CLI


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``latentcell data synth``."""
    d = SynthConfig()
    parser.add_argument(
        "--out", required=True, help="output .h5ad (directory with --split-samples)"
    )
    parser.add_argument("--schema", choices=SCHEMAS, default=d.schema, help="obs layout to mimic")
    parser.add_argument("--cells", type=int, default=d.n_cells, help="cells to write")
    parser.add_argument("--genes", type=int, default=d.n_genes, help="genes to write")
    parser.add_argument("--perturbations", type=int, default=d.n_perturbations, help="vcc only")
    parser.add_argument("--cell-types", type=int, default=d.n_cell_types, help="cell types")
    parser.add_argument(
        "--batches", type=int, default=d.n_batches, help="SRX samples for scbasecount"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed")
    parser.add_argument("--latent-dim", type=int, default=d.latent_dim,
                        help="dimension of the true latent state the counts come from")  # fmt: skip
    parser.add_argument("--chunk-cells", type=int, default=d.chunk_cells, help="cells per write")
    parser.add_argument("--control-fraction", type=float, default=d.control_fraction,
                        help="share of control cells (vcc)")  # fmt: skip
    parser.add_argument(
        "--pert-type-scale",
        type=float,
        default=d.pert_type_scale,
        help="sd of each perturbation's cell-type-specific latent shift (0: shared only)",
    )
    parser.add_argument("--library-median", type=float, default=d.library_median,
                        help="median counts per cell")  # fmt: skip
    parser.add_argument("--compression", choices=COMPRESSIONS, default=d.compression,
                        help="h5ad compression")  # fmt: skip
    parser.add_argument(
        "--split-samples",
        action="store_true",
        help="scbasecount: one file per SRX accession in --out, each missing ~5%% of genes",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    return SynthConfig(
        schema=args.schema,
        n_cells=args.cells,
        n_genes=args.genes,
        n_perturbations=args.perturbations,
        n_cell_types=args.cell_types,
        n_batches=args.batches,
        seed=args.seed,
        latent_dim=args.latent_dim,
        chunk_cells=args.chunk_cells,
        split_samples=args.split_samples,
        control_fraction=args.control_fraction,
        pert_type_scale=args.pert_type_scale,
        library_median=args.library_median,
        compression=args.compression,
    )


def run_synth(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 2 on a bad configuration (one ``error:`` line)."""
    try:
        config = config_from_args(args)
        path = synthesize(config, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({config.n_cells} cells x {config.n_genes} genes, schema {config.schema})")
    return 0


if __name__ == "__main__":
    sys.exit(run_synth(add_synth_arguments(argparse.ArgumentParser()).parse_args()))
