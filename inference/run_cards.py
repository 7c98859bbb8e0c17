"""A finished run's JSON files (model card, statistics), read without torch: the model
families' registry and the torch-free tools read cards through this."""

from __future__ import annotations

import json
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["load_model_card", "read_run_json"]

_DAMAGED_FIX = "the run's files are damaged: restore them, or train the run again"


def load_model_card(run_dir: str | Path, expected_class: str | None = None) -> dict:
    path = Path(run_dir) / "final" / "model_config.json"
    if not path.exists():
        raise DataValidationError(
            path.parent.parent, "final/model_config.json", "not a finished training run",
            "pass the run.dir of a completed `latentcell train` run",
        )  # fmt: skip
    card = read_run_json(path)
    if not (
        isinstance(card, dict)
        and isinstance(card.get("class"), str)
        and isinstance(card.get("config"), dict)
    ):
        raise DataValidationError(
            path, "config", "not a model card (an object with a class and a config)", _DAMAGED_FIX
        )
    if expected_class and card.get("class") != expected_class:
        raise DataValidationError(
            path, "class", f"this run trained {card.get('class')}, not {expected_class}",
            "pass a run of the right stage",
        )  # fmt: skip
    return card


def read_run_json(path: Path):
    """A JSON file a run wrote (model card, statistics), with one clear error if damaged."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataValidationError(path, "file", "missing", _DAMAGED_FIX) from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise DataValidationError(path, "json", f"unreadable ({err})", _DAMAGED_FIX) from err
