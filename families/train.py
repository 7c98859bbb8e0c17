"""Train any family from its resolved run config: the shared loop for a family with a
``stage``, its own ``train`` callable otherwise. ``latentcell train`` and the leaderboard both
call this, so a family trains the same way from either."""

from __future__ import annotations

from .registry import Family


def load_family_config(family: Family, config_file: str | None, overrides: list[str]):
    """The family's run config from an optional TOML file and ``--set`` overrides."""
    from latentcell.trainer.config import load_config

    return load_config(family.config_class(), config_file, overrides)


def train_family(family: Family, config, resume: str | None = None) -> dict:
    """Train one run; returns its summary: run_dir, step, final_weights, val, cells_per_s,
    mlflow_tracking_uri, mlflow_run_id (``TrainingStopped`` propagates, see ``fit``)."""
    if family.stage is None:
        return family.load("train")(config, resume=resume)
    from latentcell.trainer.loop import fit

    result = fit(family.load("stage")(config), config, resume=resume)
    return {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "final_weights": str(result.final_dir / "model.safetensors"),
        "val": result.val_metrics,
        "cells_per_s": round(result.cells_per_s, 1),
        "mlflow_tracking_uri": result.tracking_uri,
        "mlflow_run_id": result.mlflow_run_id,
    }
