"""The built-in dataset every stage trains on when ``data.path`` is empty.

A synthetic Virtual-Cell-Challenge-style experiment (NB counts, 2 cell types, 3 batches,
20 perturbations with known effects), 2000 genes, written once as a Zarr store under
``<run root>/builtin_data`` and reused by later runs and stages.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

__all__ = ["BUILTIN_CELLS", "ensure_builtin_store"]

BUILTIN_CELLS = 20_000
BUILTIN_GENES = 2000


def ensure_builtin_store(root: Path, create: bool = True) -> Path:
    """Path of the built-in store under ``root``, synthesizing and building it if needed."""
    store = Path(root) / "builtin_data" / "synthetic_vcc.zarr"
    if store.exists() or not create:
        return store
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    store.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.parent) as tmp:
        h5ad = Path(tmp) / "synthetic_vcc.h5ad"
        synthesize(
            SynthConfig(
                schema="vcc",
                n_cells=BUILTIN_CELLS,
                n_genes=BUILTIN_GENES,
                n_perturbations=20,
                n_cell_types=2,
                n_batches=3,
                seed=0,
            ),
            h5ad,
        )
        build_store([h5ad], store, format="zarr", schema="vcc")  # atomic: temp dir + rename
    return store


def check_count_store(path: Path) -> None:
    """``data.path`` must be a store of counts (Zarr or WebDataset), not a latent store: one
    clear line here instead of a shape error deep inside a model."""
    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.data_pipelines.store_common import read_manifest

    fmt = read_manifest(path)["format"]
    if fmt not in ("zarr", "webdataset"):
        raise DataValidationError(
            path, "data.path", f"a {fmt} store (per-cell VAE latents), not a store of counts",
            "pass the store `latentcell data build` wrote; the DiT stage makes its latent "
            "store itself from the VAE run",
        )  # fmt: skip


class CountStoreInput:
    """The count store a stage trains on: ``data.path``, or the built-in synthetic set under
    the run root, which the main process creates in ``prepare_data`` (``ensure_store``)."""

    def __init__(self, data_path: str, run_root: Path) -> None:
        self._path: Path | None = Path(data_path) if data_path else None
        self._root = run_root
        self._checked = False

    @property
    def store(self) -> Path:
        if self._path is None:
            self._path = ensure_builtin_store(self._root, create=False)
        elif not self._checked:
            check_count_store(self._path)
            self._checked = True
        return self._path

    def ensure_store(self) -> Path:
        """The store, built first if it is the built-in one; says so in one line (stderr),
        so a run without ``data.path`` never trains on synthetic cells unannounced."""
        if self._path is None:
            store = ensure_builtin_store(self._root, create=False)
            doing = "using" if store.exists() else "synthesizing (about 15 s, once)"
            print(
                f"data.path is empty: {doing} the built-in synthetic data set "
                f"({BUILTIN_CELLS:,} cells x {BUILTIN_GENES:,} genes) at {store}; "
                "pass --set data.path=STORE to train on your own store",
                file=sys.stderr,
                flush=True,
            )
            self._path = ensure_builtin_store(self._root, create=True)
        return self._path
