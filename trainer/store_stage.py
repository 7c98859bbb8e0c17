"""The count store a stage trains on and its metadata, read once: where the VAE and both
ST stages start, written once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentcell.data_pipelines.blocks import StoreMeta
from latentcell.data_pipelines.stores import open_store

from .builtin_data import CountStoreInput

__all__ = ["CountStoreStage"]


class CountStoreStage:
    """Base of the stages that train on one count store: ``data.path``, or the built-in
    synthetic one under ``run.root`` (created by ``prepare_data`` through ``_input``)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._input = CountStoreInput(config.data.path, config.run.root_path)
        self._meta: StoreMeta | None = None

    @property
    def store(self) -> Path:
        return self._input.store

    @property
    def meta(self) -> StoreMeta:
        """The training store's metadata, read once (sizes, categories, read units)."""
        if self._meta is None:
            self._meta = open_store(self.store).meta
        return self._meta
