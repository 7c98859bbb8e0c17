"""Run config: defaults, TOML file, dotted overrides, type errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from latentcell.trainer.config import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    dump_toml,
    load_config,
    parse_override,
)
from latentcell.trainer.sections import TrainConfig
from latentcell.trainer.vae_stage import VAERunConfig


@dataclass(frozen=True)
class Parent:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=7, ema=True))


def test_every_key_has_a_default():
    config = load_config(VAERunConfig)
    assert config == VAERunConfig()
    assert config.train.max_steps == 1000 and config.model.likelihood == "nb"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nmax_steps = 50\nseed = 3\n[model]\nlikelihood = "zinb"\n')
    config = load_config(
        VAERunConfig, path, ["train.max_steps=7", "run.dir=out/x", "optim.lr=2e-3"]
    )
    assert config.train.max_steps == 7  # the override wins over the file
    assert config.train.seed == 3  # the file wins over the default
    assert config.model.likelihood == "zinb"
    assert config.run.dir == "out/x"  # a bare word is a string
    assert config.optim.lr == pytest.approx(2e-3)
    assert config.optim.weight_decay == VAERunConfig().optim.weight_decay


def test_round_trip_through_toml(tmp_path):
    config = load_config(VAERunConfig, None, ["train.ema=true", "tracking.uri=sqlite:///a.db"])
    dump_toml(config, tmp_path / "config.toml")
    assert load_config(VAERunConfig, tmp_path / "config.toml") == config
    assert not (tmp_path / "config.toml.tmp").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=5", "unknown config key 'train.max_step'"),
        ("trian.max_steps=5", "unknown config key 'trian'"),
        ("train.max_steps=many", "train.max_steps must be an integer"),
        ("train.ema=1", "train.ema must be true or false"),
        ("train.max_steps=0", "max_steps"),
        ("model.likelihood=poisson", "likelihood"),
        ("train=3", "train is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(VAERunConfig, None, [override])


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1.5e-3") == (["a"], 1.5e-3)
    assert parse_override('a=["x", "y"]') == (["a"], ["x", "y"])
    assert parse_override("a=sqlite:///x.db") == (["a"], "sqlite:///x.db")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(VAERunConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(VAERunConfig, bad)


def test_to_dict_is_plain():
    d = config_to_dict(VAERunConfig())
    assert set(d) == {"run", "data", "split", "model", "optim", "train", "tracking"}
    assert isinstance(d["train"]["max_steps"], int)


def test_override_keeps_the_parent_configs_section_defaults():
    # Overriding one key of a section must not reset the section's other keys to the
    # section class's own defaults.
    config = load_config(Parent, None, ["train.seed=3"])
    assert config.train.max_steps == 7 and config.train.ema and config.train.seed == 3


def test_list_keys_take_toml_lists_or_comma_separated_words(tmp_path):
    from latentcell.trainer.dit_stage import DiTRunConfig

    config = load_config(DiTRunConfig, None, ["model.conditions=cell_type,batch"])
    assert config.model.conditions == ("cell_type", "batch")
    config = load_config(DiTRunConfig, None, ['model.continuous=["pseudotime"]'])
    assert config.model.continuous == ("pseudotime",)
    assert load_config(DiTRunConfig, None, ["model.conditions="]).model.conditions == ()
    path = tmp_path / "dit.toml"
    dump_toml(config, path)
    assert load_config(DiTRunConfig, path) == config
