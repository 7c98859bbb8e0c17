"""What a translation reads and writes, shared by the torch translator
(``multiomics_translator.py``) and the torch-free one of the ONNX runtime
(``export/runtime/translate.py``): they differ only in how proportions are computed.

Inputs are matched by name: RNA genes like every other reader (var_names, else id or symbol
columns: ``inference/gene_names.py``), proteins by their ``obsm`` column names (an unnamed
array must have the run's proteins in the run's order). Counts are checked
(``data_pipelines/paired_counts.py``) before anything is encoded.

The written file (``translate_file``): ``--to protein`` keeps the input and puts the predicted
protein counts in ``obsm[key]`` (a DataFrame named by the run's proteins), moving measured
ones to ``obsm[key + "_measured"]``; ``--to rna`` writes the predicted RNA counts in X on the
run's genes, with the input's obs and obsm. Counts are NB means at the run's median training
library of that modality: the measured modality says nothing reliable about the other's
depth, so one library for every cell keeps the counts honest about what was predicted,
proportions. No torch here.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["TARGETS", "TARGET_SUM", "TranslatorBase"]

TARGETS = ("protein", "rna")
TARGET_SUM = 1e4


class TranslatorBase:
    """genes / proteins in model order; ``library``: the median training library per
    modality; subclasses implement ``proportions``."""

    name = "multiomics"

    def __init__(self, genes, proteins, library: dict, protein_key: str, source: str) -> None:
        self.genes, self.proteins = list(genes), list(proteins)
        self.library, self.protein_key, self.source = dict(library), protein_key, source

    def proportions(self, counts: np.ndarray, source: str, target: str) -> np.ndarray:
        """Decoded proportions of ``target`` (rows sum to 1) for counts of ``source`` in the
        run's feature order."""
        raise NotImplementedError

    def normalized(self, counts: np.ndarray, source: str, target: str) -> np.ndarray:
        """log1p(proportion * 1e4): the target's normalized expression."""
        return np.log1p(self.proportions(counts, source, target) * TARGET_SUM)

    def rna_matrix(self, adata, source) -> np.ndarray:
        """The cells' RNA counts on the run's genes, in its order (n, n_genes)."""
        from latentcell.data_pipelines.paired_counts import rna_counts
        from latentcell.inference.predict import _gene_matrix

        fix = "pass cells measured on the run's genes (its training file's var_names)"
        columns = _gene_matrix(adata, self.genes, source, fix)
        return rna_counts(adata, source)[:, columns].toarray()

    def protein_matrix(self, adata, source, key: str | None = None) -> np.ndarray:
        """The cells' protein counts on the run's proteins, in its order (n, n_proteins)."""
        from latentcell.data_pipelines.paired_counts import protein_counts

        key = key or self.protein_key
        values, names = protein_counts(adata, key, source)
        named = hasattr(adata.obsm[key], "columns") or f"{key}_names" in adata.uns
        if not named:  # an unnamed array: the run's proteins, in order, by its width
            if values.shape[1] != len(self.proteins):
                raise DataValidationError(
                    source, f"obsm['{key}']", f"{values.shape[1]} unnamed protein columns, the "
                    f"run has {len(self.proteins)}", "store the proteins as a DataFrame named "
                    "like the training file's columns",
                )  # fmt: skip
            return values
        position = {name: i for i, name in enumerate(names)}
        missing = [p for p in self.proteins if p not in position]
        if missing:
            raise DataValidationError(
                source, f"obsm['{key}']", f"{len(missing)} of the run's {len(self.proteins)} "
                f"proteins are missing (first {missing[:3]})", "measure the run's proteins "
                "(names as in its training file)",
            )  # fmt: skip
        return values[:, [position[p] for p in self.proteins]]

    def translate_file(self, adata, target: str, source, key: str | None = None):
        """The file ``predict --to TARGET`` writes (module docstring)."""
        import anndata as ad
        import pandas as pd

        from latentcell.inference.gene_names import GeneNames

        key = key or self.protein_key
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        note = {"predictor": self.name, "source": self.source,
                "translated": "rna -> protein" if target == "protein" else "protein -> rna",
                "library": self.library[target],
                "values": f"NB means at the run's median training {target} library"}  # fmt: skip
        if target == "protein":
            counts = self.proportions(self.rna_matrix(adata, source), "rna", "protein")
            out = adata.copy()
            if key in out.obsm:  # measured values stay beside the prediction
                out.obsm[f"{key}_measured"] = out.obsm[key]
            out.obsm[key] = pd.DataFrame(counts * self.library["protein"], index=out.obs_names,
                                         columns=pd.Index(self.proteins))  # fmt: skip
        else:
            counts = self.proportions(self.protein_matrix(adata, source, key), "protein", "rna")
            out = ad.AnnData(
                X=(counts * self.library["rna"]).astype(np.float32), obs=adata.obs.copy(),
                var=GeneNames.from_card(self.genes).var_frame(), obsm=dict(adata.obsm.items()),
            )  # fmt: skip
            out.obs_names = adata.obs_names
        out.uns["latentcell"] = note
        return out
