"""The spatial benchmark's input: spots checked once, a prepared copy whose obs carries the
coordinates as numeric columns, the k folds over spots, and each fold's training store.

The DiT conditions on numeric obs columns of a store (``model.continuous``), and an h5ad keeps
spot coordinates in ``obsm['spatial']``, so the prepared copy writes them into
``obs['spatial_x']`` and ``obs['spatial_y']``; the layer is kept as a string column for the
classifier only (the models never see it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.read_h5ad import read_h5ad

COORDS = ("spatial_x", "spatial_y")  # the DiT's two continuous conditions
MIN_SPOTS_PER_FOLD = 5


@dataclass(frozen=True)
class Spots:
    """Raw counts (CSR), coordinates (n, 2) and layer labels of every spot with a layer."""

    adata: ad.AnnData  # obs: spatial_x, spatial_y, layer (str)
    source: str
    layer_col: str

    @property
    def xy(self) -> np.ndarray:
        return self.adata.obs[list(COORDS)].to_numpy(np.float64)

    @property
    def layers(self) -> np.ndarray:
        return self.adata.obs["layer"].astype(str).to_numpy()


def load_spots(path: str, layer_col: str, folds: int) -> Spots:
    """The input, checked before any training: a file, raw counts, ``obsm['spatial']`` of
    shape (n, 2) and finite, the layer column, and enough spots for the folds."""
    from latentcell.evaluation.protocol import check_counts

    if not Path(path).is_file():
        raise DataValidationError(path, "--data", "not a file", "pass an existing .h5ad file")
    adata = read_h5ad(path, "--data")
    if "spatial" not in adata.obsm:
        raise DataValidationError(
            path, "obsm['spatial']", "missing: no spot coordinates",
            "store the coordinates as an (n_spots, 2) array in obsm['spatial']",
        )  # fmt: skip
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise DataValidationError(
            path, "obsm['spatial']", f"needs finite (n, 2) coordinates, got shape {xy.shape}",
            "store x and y of every spot in obsm['spatial'][:, :2]",
        )  # fmt: skip
    if layer_col not in adata.obs:
        raise DataValidationError(
            path, f"obs['{layer_col}']", "missing: the layer classifier needs a label per spot",
            f"add the column or pass --layer-col (obs has {list(adata.obs.columns)[:10]})",
        )  # fmt: skip
    check_counts(adata, path)
    labelled = adata.obs[layer_col].notna().to_numpy()
    if not labelled.all():
        print(f"note: {int((~labelled).sum())} spots without a {layer_col} are left out")
    n = int(labelled.sum())
    if n < MIN_SPOTS_PER_FOLD * folds:
        raise DataValidationError(
            path, "spots", f"{n} labelled spots for {folds} folds",
            f"pass --folds <= {max(n // MIN_SPOTS_PER_FOLD, 1)} or more spots",
        )  # fmt: skip
    rows = np.flatnonzero(labelled)
    obs = pd.DataFrame(
        {COORDS[0]: xy[rows, 0], COORDS[1]: xy[rows, 1],
         "layer": adata.obs[layer_col].to_numpy()[rows].astype(str)},
        index=adata.obs_names[rows].astype(str),
    )  # fmt: skip
    obs["layer"] = obs["layer"].astype("category")
    X = sp.csr_matrix(adata.X[rows], dtype=np.float32)
    spots = ad.AnnData(X=X, obs=obs, var=adata.var[[]].copy())
    return Spots(spots, path, layer_col)


def fold_rows(n_spots: int, k: int, seed: int) -> list[np.ndarray]:
    """Held-out rows of each fold: one seeded permutation dealt into ``k`` near-equal parts
    (k = 5 holds out 20% of the spots each time, and every spot once)."""
    order = np.random.default_rng(seed).permutation(n_spots)
    return [np.sort(part) for part in np.array_split(order, k)]


def build_fold_store(train: ad.AnnData, folder: Path, n_genes: int) -> Path:
    """The training spots as a Zarr store on their ``n_genes`` most variable genes (Seurat v3,
    chosen on the training spots only), the coordinates as numeric obs columns."""
    from latentcell.data_pipelines.build import build_store

    store = folder / "train.zarr"
    if not store.exists():  # the builder writes it under a temporary name, then renames
        folder.mkdir(parents=True, exist_ok=True)
        h5ad = folder / "train_spots.h5ad"
        train.write_h5ad(h5ad)
        hvg = n_genes if n_genes < train.n_vars else None
        build_store([h5ad], store, schema="generic", hvg=hvg)
        h5ad.unlink()
    return store
