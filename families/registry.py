"""One table of model families: what ``latentcell train <family>``, ``latentcell predict
--run``, ``latentcell export`` and ``latentcell benchmark perturbation`` enumerate.

A family declares, in one place:

- ``config``: its run-config dataclass (``--config`` / ``--set`` resolve into it);
- ``stage``: its training stage for the shared loop (``trainer.loop.fit``), or ``train``: a
  callable ``(config) -> dict`` for a family fitted outside the loop (plug-in numpy models);
- ``model_class``: the ``class`` its runs write into ``final/model_config.json``, which is
  how ``predict --run`` and ``export`` find the family of a finished run;
- ``predictor``: ``(run_dir, PredictOptions) -> RunPredictor`` (``inference.predict``),
  control cells + perturbation labels -> predicted cells, for perturbation families;
- ``translator``: ``(run_dir, weights) -> Translator`` (``inference.multiomics_translator``),
  cells measured in one modality -> the other (``predict --run RUN --cells F --to ...``);
- ``exporter``: ``(run_dir, card, weights, **options) -> export.exporters.ExportPlan``;
- ``modes``: its ``predict --mode`` choices (the first is the default);
- ``fallbacks``: its predictor accepts ``--unseen generic`` / ``--unseen-cell-type unknown``
  (parameters learned for labels it has not seen; ST's dropout options);
- ``variants``: further configurations the leaderboard trains and ranks beside the default,
  as (name, ``--set`` overrides) (latent-delta's absolute target);
- ``sampling``: its predictor takes ``--steps`` / ``--guidance`` (an iterative sampler);
- ``vae``: it trains in a count VAE's latent space (``vae.run``); the leaderboard passes the
  VAE it trains on the split's training cells.

References are ``"module:attribute"`` strings, resolved only when used: the table imports
nothing heavy (``latentcell --help`` stays fast) and any layer may read it without importing
the layers above it. Adding a family = its model file, its stage file, one entry here, and an
export graph if it exports (README, "Adding a model family").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["BASELINES", "FAMILIES", "Family", "family_named", "family_of_card", "family_of_run"]


def resolve(reference: str):
    """The attribute a ``"module:attribute"`` string names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    config: str
    model_class: str
    stage: str | None = None
    train: str | None = None
    predictor: str | None = None
    translator: str | None = None
    exporter: str | None = None
    modes: tuple[str, ...] = ()
    fallbacks: bool = False
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()
    vae: bool = False
    sampling: bool = False

    @property
    def predicts_perturbations(self) -> bool:
        return self.predictor is not None

    def config_class(self) -> type:
        return resolve(self.config)

    def load(self, field_name: str):
        """The object one of the reference fields names (``"stage"``, ``"predictor"``, ...)."""
        return resolve(getattr(self, field_name))


_T = "latentcell.trainer"
_I = "latentcell.inference"
_E = "latentcell.export.exporters"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "vae", "count VAE (NB/ZINB/Gaussian): the latent space of generation and prediction",
            f"{_T}.vae_stage:VAERunConfig", "latentcell.models.count_vae.CountVAE",
            stage=f"{_T}.vae_stage:VAEStage", exporter=f"{_E}:plan_vae",
        ),
        Family(
            "dit", "latent diffusion (DiT) generating cells under conditions",
            f"{_T}.dit_stage:DiTRunConfig", "latentcell.models.latent_diffusion.LatentDiffusion",
            stage=f"{_T}.dit_stage:DiTStage", exporter=f"{_E}:plan_dit",
        ),
        Family(
            "st", "ST set transformer: control sets -> perturbed populations",
            f"{_T}.st_stage:STRunConfig", "latentcell.models.st_model.STModel",
            stage=f"{_T}.st_stage:STStage", predictor=f"{_I}.st_predictor:load_predictor",
            exporter=f"{_E}:plan_st", fallbacks=True,
        ),
        Family(
            "st-pretrain", "ST pretraining on unlabelled sets (masked-set imputation)",
            f"{_T}.st_pretrain_stage:STPretrainRunConfig",
            "latentcell.models.st_pretrain.STPretrainModel",
            stage=f"{_T}.st_pretrain_stage:STPretrainStage", exporter=f"{_E}:plan_st",
        ),
        Family(
            "cvae", "conditional VAE (seed 003): controls re-decoded (b) or prior samples (a)",
            f"{_T}.cvae_stage:CVAERunConfig", "latentcell.models.cvae.ConditionalVAE",
            stage=f"{_T}.cvae_stage:CVAEStage", predictor=f"{_I}.cvae_predictor:load_predictor",
            exporter="latentcell.export.cvae_export:plan_cvae", modes=("b", "a"),
        ),
        Family(
            "latent-shift", "latent-shift predictors (seed 004): embedding shifts, decoded to genes",
            f"{_T}.latent_shift_stage:LatentShiftRunConfig",
            "latentcell.models.latent_shift.LatentShiftRun",
            train=f"{_T}.latent_shift_stage:train_latent_shift",
            predictor=f"{_I}.latent_shift_predictor:load_predictor",
        ),
        Family(
            "latent-delta", "perturbation latent diffusion (seeds 000/001): a shift in the VAE "
            "latent, its mean predicted and its distribution sampled by a conditional DiT",
            f"{_T}.latent_delta_stage:LatentDeltaRunConfig",
            "latentcell.models.latent_delta.LatentDelta",
            stage=f"{_T}.latent_delta_stage:LatentDeltaStage",
            predictor=f"{_I}.latent_delta_predictor:load_predictor",
            exporter="latentcell.export.latent_delta_export:plan_latent_delta",
            modes=("sampled", "deterministic"),
            variants=(("absolute", ("model.target=absolute",)),), vae=True, sampling=True,
        ),
        Family(
            "masked-diffusion-pretrain", "discrete-diffusion pretraining on observational "
            "sets (seed 002): half of a group set generated from the other half",
            f"{_T}.masked_diffusion_stage:MaskedDiffusionPretrainRunConfig",
            "latentcell.models.masked_diffusion.MaskedDiffusionPretrain",
            stage=f"{_T}.masked_diffusion_stage:MaskedDiffusionPretrainStage",
        ),
        Family(
            "masked-diffusion", "conditional discrete diffusion (seed 002): binned genes "
            "unmasked by confidence, given a control set and the perturbation",
            f"{_T}.masked_diffusion_stage:MaskedDiffusionRunConfig",
            "latentcell.models.masked_diffusion.MaskedDiffusion",
            stage=f"{_T}.masked_diffusion_stage:MaskedDiffusionStage",
            predictor=f"{_I}.masked_diffusion_predictor:load_predictor",
            exporter="latentcell.export.masked_diffusion_export:plan_masked_diffusion",
            variants=(("uniform", ("masking.adaptive=0",)),), sampling=True,
        ),
        Family(
            "multiomics", "joint RNA + protein VAE (seed 001): one latent from either "
            "modality, RNA -> protein and protein -> RNA translation",
            f"{_T}.multiomics_stage:MultiomicsRunConfig", "latentcell.models.multiomics.MultiomicsVAE",
            stage=f"{_T}.multiomics_stage:MultiomicsStage",
            translator=f"{_I}.multiomics_translator:load_translator",
            exporter="latentcell.export.multiomics_export:plan_multiomics",
        ),
    )
}  # fmt: skip

# Baselines are fitted on training cells when they predict (no run): ``predict --baseline``
# and the leaderboard enumerate these; ``evaluation.perturbation_baselines.fit_baseline`` fits
# them (its ``BASELINES`` names the same ones: tests/families/test_registry.py).
BASELINES: dict[str, str] = {
    "control": "the control cells themselves (no effect)",
    "mean": "the training perturbed cells' mean shift (cell-eval's baseline)",
    "additive": "per-perturbation mean shift, summed over a combination's genes",
    "linear": "ridge regression of the shift on the perturbation's genes",
    "latent": "scGen: the perturbation's mean shift in a count VAE's latent space",
}


def family_named(name: str, source: str = "latentcell") -> Family:
    if name not in FAMILIES:
        raise DataValidationError(
            source, "family", f"unknown model family {name!r}", f"use one of {sorted(FAMILIES)}"
        )
    return FAMILIES[name]


def family_of_card(card: dict, source) -> Family:
    """The family whose runs write ``card["class"]``."""
    for family in FAMILIES.values():
        if family.model_class == card.get("class"):
            return family
    raise DataValidationError(
        source, "class", f"no model family writes {card.get('class')!r}",
        f"pass a run of one of the families {sorted(FAMILIES)}",
    )  # fmt: skip


def family_of_run(run_dir: str | Path) -> Family:
    """The family of a finished run, from its model card."""
    from latentcell.inference.run_cards import load_model_card

    return family_of_card(load_model_card(run_dir), Path(run_dir) / "final" / "model_config.json")
