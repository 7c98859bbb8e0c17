"""Which part of a label never had a trained embedding, per encoder kind."""

from __future__ import annotations

from latentcell.models.perturbation_labels import untrained_parts

TRAINED = ["non-targeting", "A", "B+C"]


def test_onehot_needs_the_label_itself():
    assert untrained_parts("A", TRAINED, "onehot") == []
    assert untrained_parts("A+B", TRAINED, "onehot") == ["A+B"]


def test_gene_table_needs_each_gene():
    assert untrained_parts("C+A", TRAINED, "gene_table") == []
    assert untrained_parts("A+D+ctrl", TRAINED, "gene_table", control_label="ctrl") == ["D"]


def test_external_vectors_and_unrecorded_runs_are_never_untrained():
    assert untrained_parts("Z", TRAINED, "external") == []
    assert untrained_parts("Z", None, "onehot") == []
