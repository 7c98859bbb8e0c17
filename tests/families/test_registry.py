"""The family registry: every reference resolves, runs find their family by their card, and
the baselines it lists are the ones ``fit_baseline`` fits."""

from __future__ import annotations

import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.families import BASELINES, FAMILIES, family_of_card

REFERENCES = ("config", "stage", "train", "predictor", "translator", "exporter")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_reference_resolves(name):
    family = FAMILIES[name]
    assert (family.stage is None) != (family.train is None)  # the loop or its own train
    for field in REFERENCES:
        if getattr(family, field):
            assert callable(family.load(field)), field
    assert family_of_card({"class": family.model_class}, "card") is family


def test_model_classes_are_unique_and_unknown_cards_are_one_line():
    classes = [f.model_class for f in FAMILIES.values()]
    assert len(classes) == len(set(classes))
    with pytest.raises(DataValidationError, match="no model family"):
        family_of_card({"class": "somewhere.Else"}, "card.json")


def test_baselines_are_the_fitted_ones():
    from latentcell.evaluation.perturbation_baselines import BASELINES as FITTED

    assert tuple(BASELINES) == FITTED
