"""Load what a finished run left in ``<run>/final``: its model card and weights.

Later stages (the latent DiT, generation, export) start from earlier runs; this is the one
place that knows how a run directory is laid out, and the errors say which run to train.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.count_vae import CountVAE, CountVAEConfig

from .run_cards import _DAMAGED_FIX, load_model_card, read_run_json

__all__ = [
    "load_count_model",
    "load_model_card",
    "load_vae",
    "load_weights",
    "read_run_json",
    "weights_path",
]

WEIGHTS = ("auto", "ema", "model")


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
    """Tensors of a safetensors file (no pickle); a truncated or foreign file is one error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: a damaged file
        detail = " ".join(str(err).split())[:200]
        raise DataValidationError(
            path, "safetensors", f"unreadable weights ({type(err).__name__}: {detail})",
            _DAMAGED_FIX,
        ) from err  # fmt: skip


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``model`` with the weights at ``path``; names and shapes must match its model card."""
    state = load_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys, size mismatches
        detail = " ".join(str(err).split())[:300]
        raise DataValidationError(
            path, "weights", f"do not fit the model card ({detail})", _DAMAGED_FIX
        ) from err
    return model


def load_count_model(
    run_dir: str | Path, which: str, model_class: type, expected_class: str
) -> tuple[CountVAE, dict, Path]:
    """(a CountVAE-family model of a finished run in eval mode, its card, its weights file):
    the count VAE and the conditional VAE share their config and loading."""
    card = load_model_card(run_dir, expected_class)
    config = dict(card["config"])
    try:
        config["covariate_keys"] = tuple(config["covariate_keys"])
        config["n_covariate_categories"] = tuple(config["n_covariate_categories"])
        model = model_class(CountVAEConfig(**config))
    except (KeyError, TypeError, ValueError) as err:
        raise DataValidationError(
            Path(run_dir) / "final" / "model_config.json", "config", f"invalid ({err})",
            _DAMAGED_FIX,
        ) from err  # fmt: skip
    path = weights_path(run_dir, which)
    load_weights(model, path)
    return model.eval(), card, path


def load_vae(run_dir: str | Path, which: str = "auto") -> tuple[CountVAE, dict]:
    """(the trained CountVAE in eval mode, provenance: run dir, weights file, sha256)."""
    model, _, path = load_count_model(
        run_dir, which, CountVAE, "latentcell.models.count_vae.CountVAE"
    )
    provenance = {
        "vae_run": str(Path(run_dir).absolute()),
        "weights": path.name,
        "weights_sha256": sha256_file(path),
    }
    return model, provenance
