"""How commands end: the next command fits what was made (pure functions, known answers)."""

from __future__ import annotations

import pytest

from latentcell.launch.next_steps import after_export, after_predict, after_train, after_translate


def _train(family: str) -> str:
    summary = {"run_dir": "runs/x", "step": 60, "val": {"val/loss": 1.5},
               "cells_per_s": 1234.0, "final_weights": "runs/x/final/model.safetensors",
               "mlflow_tracking_uri": "sqlite:////abs/mlflow.db"}  # fmt: skip
    return "\n".join(after_train(family, summary))


@pytest.mark.parametrize(
    ("family", "expected"),
    [("vae", "latentcell train dit --set vae.run=runs/x"),
     ("dit", "latentcell generate --run runs/x"),
     ("st", "latentcell predict --run runs/x"),
     ("cvae", "latentcell predict --run runs/x"),
     ("latent-shift", "latentcell predict --run runs/x"),
     ("st-pretrain", "latentcell train st --set init.run=runs/x"),
     ("multiomics", "latentcell predict --run runs/x --cells CELLS.h5ad --to protein")],
)  # fmt: skip
def test_train_names_the_next_command(family, expected):
    text = _train(family)
    assert f"next: {expected}" in text
    assert "trained " + family in text and "60 steps, validation loss 1.5" in text
    assert "mlflow ui --backend-store-uri sqlite:////abs/mlflow.db" in text
    assert ("latentcell export --run runs/x" in text) == (family != "latent-shift")


@pytest.mark.parametrize(
    ("kind", "command", "serves"),
    [("generation", "generate", True), ("prediction", "predict", True),
     ("cvae", "predict", False), ("multiomics", "translate", False),
     ("autoencoder", None, False), ("pretraining", None, False)],
)  # fmt: skip
def test_export_points_at_what_the_bundle_can_do(kind, command, serves):
    summary = {"out": "b", "kind": kind, "max_rel_error": {"g": 1e-7}, "seconds": 1.0,
               "mlflow": None}  # fmt: skip
    text = "\n".join(after_export(summary))
    if command:
        assert f"next: python -m latentcell.export.runtime {command} --bundle b" in text
    else:
        assert "onnxruntime session" in text
    assert ("serve --bundle b" in text) == serves


def test_translate_says_where_the_prediction_went():
    summary = {"out": "t.h5ad", "to": "protein", "n_cells": 100, "n_features": 49,
               "field": "obsm['protein_counts']"}  # fmt: skip
    text = "\n".join(after_translate(summary))
    assert "wrote 100 cells with 49 predicted protein features (obsm['protein_counts'])" in text
    assert "latentcell benchmark multiomics" in text


def test_predict_quotes_paths_it_suggests():
    text = "\n".join(after_predict({"out": "my preds.h5ad", "n_cells": 20, "n_perturbations": 2}))
    assert "wrote 20 cells for 2 perturbations" in text
    assert "--pred 'my preds.h5ad'" in text
