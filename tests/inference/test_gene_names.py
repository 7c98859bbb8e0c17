"""``inference/gene_names.py``: one gene-naming rule for every writer and reader, here on a
numpy predictor through ``predict_population`` (the path the CLI and runtime share)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.gene_names import GeneNames
from latentcell.inference.predict import PopulationRequest, predict_population

IDS = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
SYMBOLS = ["STAT1", "IRF1", "CD4"]


class Doubling:
    """Doubles the log1p expression of the model's genes (keys: Ensembl ids)."""

    name = "doubling"
    genes = IDS
    gene_symbols = SYMBOLS

    def predict(self, control, perturbation, cell_type, library=None, rng=None):
        return control * 2


def controls(names, extra=None) -> ad.AnnData:
    """Four control cells of the model's 3 genes plus ``EXTRA`` (not a model gene), named
    ``names``, with ``extra`` var columns."""
    counts = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    var = pd.DataFrame(extra or {}, index=[*names, "EXTRA"])
    obs = pd.DataFrame({"target_gene": ["non-targeting"] * 4}, index=[f"c{i}" for i in range(4)])
    return ad.AnnData(X=counts, obs=obs, var=var)


def predict(adata: ad.AnnData) -> ad.AnnData:
    request = PopulationRequest(("STAT1",), 6, cell_type_col=None, seed=3)
    return predict_population(Doubling(), adata, request, "ctrl.h5ad")


def test_ids_symbols_and_versions_predict_the_same_cells():
    by_symbol = predict(controls(SYMBOLS))
    by_id = predict(controls([f"{g}.7" for g in IDS]))  # versioned ids match too
    by_column = predict(controls(["a", "b", "c"], {"gene_id": [*IDS, ""]}))
    for other in (by_id, by_column):
        np.testing.assert_array_equal(other.X.toarray(), by_symbol.X.toarray())
    assert list(by_symbol.var_names) == [*SYMBOLS, "EXTRA"]  # the controls' own names
    assert list(by_id.var_names)[:3] == [f"{g}.7" for g in IDS]
    for written in (by_symbol, by_id, by_column):
        assert list(written.var["gene_id"]) == [*IDS, "EXTRA"]
        assert list(written.var["gene_symbol"]) == [*SYMBOLS, "EXTRA"]


def test_gene_order_is_the_controls_and_extra_genes_keep_their_counts():
    order = [2, 0, 1]
    plain = predict(controls(SYMBOLS)).X.toarray()
    shuffled = controls([SYMBOLS[i] for i in order])
    shuffled.X = shuffled.X[:, [*order, 3]]
    got = predict(shuffled)
    assert list(got.var_names) == [*(SYMBOLS[i] for i in order), "EXTRA"]
    np.testing.assert_array_equal(got.X.toarray(), plain[:, [*order, 3]])
    assert set(got.X.toarray()[:, 3]) <= set(shuffled.X[:, 3])  # a drawn control's count


def test_an_ambiguous_or_repeated_or_missing_gene_is_one_line_naming_it():
    shared = GeneNames(tuple(IDS), tuple(IDS), ("STAT1", "STAT1", "CD4"))
    with pytest.raises(DataValidationError, match="'STAT1' names several") as err:
        shared.positions(["STAT1", "CD4"], "ctrl.h5ad", "var_names", "fix")
    assert (err.value.field, "\n" in str(err.value)) == ("var_names", False)
    names = GeneNames.from_card(IDS, SYMBOLS)
    with pytest.raises(DataValidationError, match="'STAT1' and 'ENSG00000000001' both name"):
        names.positions(["STAT1", IDS[0], "IRF1", "CD4"], "f", "controls.genes", "fix")
    with pytest.raises(DataValidationError, match="1 of the model's 3 genes are missing") as err:
        predict(controls(["STAT1", "IRF1", "CD8"]))
    assert (err.value.path, err.value.field) == ("ctrl.h5ad", "var_names")


def test_written_columns_are_never_blank():
    """Where the vocabulary lacks an id or a symbol, the name that is known stands in."""
    names = GeneNames.from_table(
        {"gene_key": [IDS[0], "FOO"], "gene_id": [IDS[0], ""], "gene_symbol": ["", "FOO"]}
    )
    var = names.var_frame()
    assert list(var.index) == [IDS[0], "FOO"]
    assert list(var["gene_id"]) == [IDS[0], "FOO"]
    assert list(var["gene_symbol"]) == [IDS[0], "FOO"]
    card = GeneNames.from_card([IDS[0], "FOO"])  # a card without symbols: keys say what they are
    assert (card.ids, card.symbols) == ((IDS[0], ""), ("", "FOO"))
