"""A model from its model card (``final/model_config.json``): where a card's class meets its
constructor, so the stage that wrote the card and the code that loads it build the same model."""

from __future__ import annotations

import torch

from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from latentcell.models.st_model import STConfig, STModel

LATENT_DIFFUSION_CLASS = "latentcell.models.latent_diffusion.LatentDiffusion"
ST_CLASS = "latentcell.models.st_model.STModel"


def build_latent_diffusion(card: dict, stats: dict | None = None) -> LatentDiffusion:
    """A LatentDiffusion from its model card (with the latent scale when ``stats`` is given)."""
    config = dict(card["config"])
    config["dit"] = DiTConfig(
        **{**config["dit"], "n_categories": tuple(config["dit"]["n_categories"])}
    )
    config["diffusion"] = DiffusionConfig(**config["diffusion"])
    for key in ("categorical_keys", "continuous_keys", "continuous_mean", "continuous_std"):
        config[key] = tuple(config[key])
    model = LatentDiffusion(LatentDiffusionConfig(**config))
    if stats is not None:
        model.set_latent_stats(torch.tensor(stats["latent_shift"]), stats["latent_scale"])
    return model


def build_st_model(card: dict) -> STModel:
    """The set model a card describes (weights not loaded)."""
    return STModel(STConfig.from_dict(card["config"]))
