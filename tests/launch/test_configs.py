"""The shipped run configs load into their stages, and the full ones list every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from latentcell.families import FAMILIES
from latentcell.trainer.config import config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


def stage_of(path: Path) -> str:
    return path.stem.removesuffix("_demo")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_config_loads(path):
    config_cls = FAMILIES[stage_of(path)].config_class()
    load_config(config_cls, str(path), [])


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize(
    "name",
    [
        "vae",
        "dit",
        "st",
        "cvae",
        "latent-shift",
        "latent-delta",
        "masked-diffusion",
        "masked-diffusion-pretrain",
        "multiomics",
    ],
)
def test_full_config_lists_every_key(name):
    config_cls = FAMILIES[name].config_class()
    written = _keys(tomllib.loads((CONFIGS / f"{name}.toml").read_text()))
    assert written == _keys(config_to_dict(config_cls()))
