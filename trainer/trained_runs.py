"""Load what a finished run left in ``<run>/final``: its model card and weights.

Later stages (the latent DiT, generation, export) start from earlier runs; this is the one
place that knows how a run directory is laid out, and the errors say which run to train.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.count_vae import CountVAE, CountVAEConfig

__all__ = ["load_model_card", "load_vae", "weights_path"]

WEIGHTS = ("auto", "ema", "model")


def load_model_card(run_dir: str | Path, expected_class: str | None = None) -> dict:
    path = Path(run_dir) / "final" / "model_config.json"
    if not path.exists():
        raise DataValidationError(
            path.parent.parent, "final/model_config.json", "not a finished training run",
            "pass the run.dir of a completed `latentcell train` run",
        )  # fmt: skip
    card = json.loads(path.read_text())
    if expected_class and card.get("class") != expected_class:
        raise DataValidationError(
            path, "class", f"this run trained {card.get('class')}, not {expected_class}",
            "pass a run of the right stage",
        )  # fmt: skip
    return card


def weights_path(run_dir: str | Path, which: str = "auto") -> Path:
    """``final/ema.safetensors`` when asked for (or, with "auto", when the run kept an EMA),
    else ``final/model.safetensors``."""
    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {which!r}")
    final = Path(run_dir) / "final"
    ema = final / "ema.safetensors"
    path = (
        ema if which == "ema" or (which == "auto" and ema.exists()) else final / "model.safetensors"
    )
    if not path.exists():
        raise DataValidationError(
            final, path.name, "missing", "the run did not finish; resume it with --resume auto"
        )
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_vae(run_dir: str | Path, which: str = "auto") -> tuple[CountVAE, dict]:
    """(the trained CountVAE in eval mode, provenance: run dir, weights file, sha256)."""
    card = load_model_card(run_dir, "latentcell.models.count_vae.CountVAE")
    config = dict(card["config"])
    config["covariate_keys"] = tuple(config["covariate_keys"])
    config["n_covariate_categories"] = tuple(config["n_covariate_categories"])
    model = CountVAE(CountVAEConfig(**config))
    path = weights_path(run_dir, which)
    model.load_state_dict(load_state(path))
    provenance = {
        "vae_run": str(Path(run_dir).absolute()),
        "weights": path.name,
        "weights_sha256": sha256_file(path),
    }
    return model.eval(), provenance
