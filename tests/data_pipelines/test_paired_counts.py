"""The RNA and protein matrices of a CITE-seq h5ad: names from a DataFrame or from uns, and
every kind of bad value as one DataValidationError naming the field."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.paired_counts import check_count_values, protein_counts, rna_counts


def _cells(protein) -> ad.AnnData:
    adata = ad.AnnData(X=sp.csr_matrix(np.ones((3, 2), np.float32)))
    adata.obsm["adt"] = protein
    return adata


def test_names_from_a_frame_from_uns_or_by_position():
    frame = pd.DataFrame(np.ones((3, 2)), columns=["CD3", "CD4"], index=[str(i) for i in range(3)])
    assert protein_counts(_cells(frame), "adt", "f")[1] == ["CD3", "CD4"]
    array = _cells(np.ones((3, 2)))
    assert protein_counts(array, "adt", "f")[1] == ["protein_0", "protein_1"]
    array.uns["adt_names"] = ["CD8", "CD19"]
    values, names = protein_counts(array, "adt", "f")
    assert names == ["CD8", "CD19"] and values.dtype == np.float32


@pytest.mark.parametrize(
    ("values", "problem"),
    [(np.array([[1.0, np.inf]]), "NaN or infinite"), (np.array([[1.0, -1.0]]), "negative"),
     (np.array([[1.0, 0.5]]), "non-integer"), (np.array([[1, -2]]), "negative")],
)  # fmt: skip
def test_bad_values_name_the_field_and_the_entry(values, problem):
    with pytest.raises(
        DataValidationError, match=f"f: obsm\\['adt'\\]: {problem}.*entry \\(0, 1\\)"
    ):
        check_count_values(values, "f", "obsm['adt']")


def test_rna_counts_are_checked_on_stored_values():
    adata = _cells(np.ones((3, 1)))
    adata.X = sp.csr_matrix(np.array([[0, 2.5], [0, 0], [1, 0]], np.float32))
    with pytest.raises(DataValidationError, match="f: X: non-integer value"):
        rna_counts(adata, "f")


def test_a_protein_matrix_that_is_not_numbers_or_unnamed_twice_is_refused():
    frame = pd.DataFrame(np.ones((3, 2)), columns=["CD3", "CD3"], index=[str(i) for i in range(3)])
    with pytest.raises(DataValidationError, match="not unique"):
        protein_counts(_cells(frame), "adt", "f")
    with pytest.raises(DataValidationError, match="missing \\(obsm holds \\['adt'\\]\\)"):
        protein_counts(_cells(np.ones((3, 2))), "protein_counts", "f")
