"""The one protocol for judging generated cells, and the preprocessing steps it fixes.

Every choice that changes a number is a field of ``GenerationProtocol`` and is written into
the summary, so two results are comparable exactly when their protocols are equal:
  1. genes aligned by ``var_names`` (every real gene must be present in every other input);
  2. raw counts required; ``normalize_total(target_sum)`` over all those genes, then log1p;
  3. ``n_hvg`` highly variable genes, Seurat v3 on raw counts (``data_pipelines.hvg``), chosen
     on the real cells that fit the PCA (training cells when ``train`` is given);
  4. PCA with ``n_pcs`` components fitted on REAL cells only (``pca_fit``: by default real
     cells held out from every compared set, else the reference cells; see ``splits``);
     every set is centred with the real mean and projected on the real loadings;
  5. per condition with at least ``min_cells`` real reference cells (``"auto"``: the smallest
     condition's count clamped to [2 * knn_k + 2, 50], see ``resolve_min_cells``), equal sample
     sizes on both sides (the larger one subsampled, seeded, at most ``max_cells_per_condition``); metrics
     are then macro-averaged over conditions.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.hvg import seurat_v3
from latentcell.evaluation.metrics import MMD_BANDWIDTHS

PCA_FIT_CHOICES = ("held_out", "reference")
HVG_METHOD = "seurat_v3 (latentcell.data_pipelines.hvg) on raw counts"
_COUNT_CHECK_VALUES = 200_000  # values inspected by the integer-counts check
_HVG_BLOCK_CELLS = 10_000
MIN_CELLS_AUTO = "auto"
MIN_CELLS_CAP = 50  # auto never asks for more reference cells than this


@dataclass(frozen=True)
class GenerationProtocol:
    """Fixed settings of the generation benchmark; all of them are logged with the results."""

    target_sum: float = 1e4
    log1p: bool = True
    n_hvg: int = 2000
    n_pcs: int = 50
    min_cells: int | str = MIN_CELLS_AUTO  # or an integer; resolved in splits.split_cells
    knn_k: int = 5
    knn_test_fraction: float = 0.5
    mmd_bandwidths: tuple[float, ...] = MMD_BANDWIDTHS
    wasserstein_exact_max: int = 5000
    seed: int = 0
    max_cells_per_condition: int = 2000
    silhouette_max_cells: int = 5000
    pca_fit: str = "held_out"  # or "reference"; see latentcell.evaluation.splits

    def __post_init__(self) -> None:
        for name in ("n_hvg", "n_pcs", "knn_k", "max_cells_per_condition"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerationProtocol.{name} must be >= 1")
        _check_min_cells(self.min_cells, self.knn_k)
        if self.pca_fit not in PCA_FIT_CHOICES:
            raise ValueError(f"GenerationProtocol.pca_fit must be one of {PCA_FIT_CHOICES}")
        if not 0.0 < self.knn_test_fraction < 1.0:
            raise ValueError("GenerationProtocol.knn_test_fraction must be in (0, 1)")

    def as_dict(self) -> dict:
        """The fields (and the fixed HVG method), JSON-ready."""
        out = asdict(self)
        out["mmd_bandwidths"] = [float(b) for b in self.mmd_bandwidths]
        out["hvg_method"] = HVG_METHOD
        out["pca_centring"] = "every set centred with the mean of the PCA's real cells"
        return out


def min_cells_floor(knn_k: int) -> int:
    """The fewest reference cells a condition may have: the kNN AUC's held-out split needs
    more than ``knn_k`` cells per side on both halves."""
    return 2 * knn_k + 2


def _check_min_cells(min_cells: int | str, knn_k: int) -> None:
    if min_cells == MIN_CELLS_AUTO:
        return
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)):
        raise ValueError(
            f"GenerationProtocol.min_cells must be an integer or 'auto', got {min_cells!r}"
        )
    if min_cells < min_cells_floor(knn_k):
        raise ValueError("GenerationProtocol.min_cells must be at least 2 * knn_k + 2")


def resolve_min_cells(protocol: GenerationProtocol, sizes: list[int]) -> int:
    """The min_cells a run uses, given each condition's number of reference cells.

    ``"auto"``: the smallest size clamped to [floor, MIN_CELLS_CAP], so data whose conditions
    all reach 50 cells is judged as with 50, and smaller conditions are let in down to the
    floor the kNN AUC needs instead of being skipped silently. An integer is used as given.
    """
    if protocol.min_cells != MIN_CELLS_AUTO:
        return int(protocol.min_cells)
    floor = min_cells_floor(protocol.knn_k)
    return max(floor, min(MIN_CELLS_CAP, min(sizes, default=floor)))


DEFAULT_PROTOCOL = GenerationProtocol()  # frozen, so safe as a shared default argument


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (stable across runs and order)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


# Joins the values of several condition columns into one group label.
CONDITION_JOIN = " | "


def condition_columns(condition_col: str) -> list[str]:
    """``"cell_type,condition"`` -> ``["cell_type", "condition"]``: a group is a combination
    of the columns' values (cell type x stimulation, say), with no hand-made column."""
    return [c.strip() for c in condition_col.split(",") if c.strip()]


def check_condition_column(
    adata: ad.AnnData, source: str, condition_col: str, option: str = "--condition-col"
) -> None:
    """Every column of ``condition_col`` (given by ``option``) must exist in ``obs``."""
    columns = condition_columns(condition_col)
    if not columns:
        raise DataValidationError(
            source, option, "no column named", "pass one or more comma-separated obs columns"
        )
    for column in columns:
        if column not in adata.obs.columns:
            raise DataValidationError(
                source,
                f"obs['{column}']",
                f"column not found (obs has {list(adata.obs.columns)[:10]})",
                f"pass {option} naming columns present in every input",
            )


def check_input(
    adata: ad.AnnData,
    source: str,
    condition_col: str,
    genes: pd.Index | None = None,
    classifier_col: str | None = None,
) -> ad.AnnData:
    """All input checks for one AnnData: condition (and classifier) columns, raw counts,
    reference genes. Returns ``adata``, re-keyed by gene symbol or id when that is how it
    matches the genes."""
    check_condition_column(adata, source, condition_col)
    if classifier_col is not None:
        check_condition_column(adata, source, classifier_col, "--classifier-col")
    check_counts(adata, source)
    if genes is not None:
        adata = match_gene_names(adata, genes)
        check_genes(adata, source, genes)
    return adata


def match_gene_names(adata: ad.AnnData, genes: pd.Index) -> ad.AnnData:
    """``adata`` keyed so that its var_names contain ``genes``: as it is, or (a shallow copy)
    keyed by its ``gene_symbol`` or ``gene_id`` column. Stores key genes by id while many
    h5ad files use symbols; generated files carry both columns."""
    names = pd.Index(adata.var_names.astype(str))
    if genes.isin(names).all():
        return adata
    for column in ("gene_symbol", "gene_id"):
        if column in adata.var:
            keys = pd.Index(adata.var[column].astype(str))
            if keys.is_unique and genes.isin(keys).all():
                keyed = adata.copy() if adata.isbacked else adata[:, :]
                keyed.var_names = keys
                return keyed
    return adata


def condition_labels(adata: ad.AnnData, condition_col: str) -> np.ndarray:
    """The condition of each cell, as strings: with several columns, their values joined by
    ``CONDITION_JOIN`` in the order given."""
    columns = condition_columns(condition_col)
    labels = adata.obs[columns[0]].astype(str).to_numpy()
    for column in columns[1:]:
        labels = np.char.add(np.char.add(labels.astype(str), CONDITION_JOIN),
                             adata.obs[column].astype(str).to_numpy().astype(str))  # fmt: skip
    return labels.astype(object)


def check_counts(adata: ad.AnnData, source: str) -> None:
    """``.X`` must hold raw counts: finite, non-negative, integer-valued (checked on a sample)."""
    x = adata.X
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = np.asarray(values[:_COUNT_CHECK_VALUES], dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        raise DataValidationError(
            source,
            "X",
            f"raw counts are required but .X holds non-count values (e.g. {values[bad][0]:.4g})",
            "pass integer counts (e.g. copy layers['counts'] into .X); the protocol normalises "
            "and log-transforms itself",
        )


def reference_genes(real: ad.AnnData, source: str) -> pd.Index:
    """The real data's genes, which every other input must contain."""
    genes = pd.Index(real.var_names.astype(str))
    if genes.has_duplicates:
        dup = genes[genes.duplicated()][0]
        raise DataValidationError(
            source, "var_names", f"duplicate gene names (e.g. {dup!r})", "make var_names unique"
        )
    return genes


def check_genes(adata: ad.AnnData, source: str, genes: pd.Index) -> None:
    """Every reference gene must be present in ``adata.var_names``."""
    missing = genes.difference(pd.Index(adata.var_names.astype(str)), sort=False)
    if len(missing):
        raise DataValidationError(
            source,
            "var_names",
            f"{len(missing)} of the {len(genes)} real genes are missing (e.g. {missing[0]!r})",
            "generate counts for every gene of the real data, with the same var_names",
        )


def counts_matrix(
    adata: ad.AnnData, genes: pd.Index, rows: np.ndarray | None = None
) -> sp.csr_matrix:
    """Counts of ``rows`` (all cells when None) for ``genes`` in that order, as float64 CSR."""
    col = pd.Index(adata.var_names.astype(str)).get_indexer(genes)
    x = sp.csr_matrix(adata.X if rows is None else adata.X[rows])
    return sp.csr_matrix(x[:, col], dtype=np.float64)


def select_hvgs(counts: sp.csr_matrix, n_hvg: int) -> np.ndarray:
    """Column indices (in gene order) of the ``n_hvg`` most variable genes, Seurat v3."""
    if n_hvg >= counts.shape[1]:
        return np.arange(counts.shape[1])

    def blocks():
        for start in range(0, counts.shape[0], _HVG_BLOCK_CELLS):
            yield counts[start : start + _HVG_BLOCK_CELLS]

    table = seurat_v3(blocks, counts.shape[1], n_hvg)
    return np.flatnonzero(table["highly_variable"].to_numpy())


def log_normalize(
    counts: sp.csr_matrix, genes: np.ndarray, protocol: GenerationProtocol
) -> np.ndarray:
    """Dense ``log1p(counts / total * target_sum)`` on ``genes``; totals over ALL aligned genes."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(protocol.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    expr = counts[:, genes].toarray() * scale[:, None]
    return np.log1p(expr) if protocol.log1p else expr


@dataclass(frozen=True)
class RealPCA:
    """PCA fitted on real reference expression; projects any set with the REAL mean."""

    mean: np.ndarray
    components: np.ndarray  # (n_pcs, n_genes)

    @classmethod
    def fit(cls, real_expr: np.ndarray, n_pcs: int, seed: int) -> RealPCA:
        n_components = min(n_pcs, real_expr.shape[0] - 1, real_expr.shape[1])
        pca = PCA(n_components=n_components, random_state=seed).fit(real_expr)
        return cls(mean=pca.mean_, components=pca.components_)

    def transform(self, expr: np.ndarray) -> np.ndarray:
        return (expr - self.mean) @ self.components.T

    def inverse(self, scores: np.ndarray) -> np.ndarray:
        """Back to expression space: ``scores @ loadings + real mean``."""
        return scores @ self.components + self.mean
