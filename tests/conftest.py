"""Shared fixtures: where the real datasets live (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$LATENTCELL_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("LATENTCELL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_file():
    """Return a function mapping a file name in the shared data folder to its path, or skip."""

    def _get(name: str) -> Path:
        path = shared_data_dir() / name
        if not path.exists():
            pytest.skip(f"real dataset {path} is absent")
        return path

    return _get
