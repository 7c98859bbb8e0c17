"""Frozen dataclass configs <-> plain dicts, TOML files and dotted ``--set`` overrides.

Every run is described by one tree of frozen dataclasses (one per component, composed into a
stage's run config). Every field has a default, so a run needs no file at all; a TOML file
and then ``--set a.b=c`` overrides are applied on top, in that order. Values are parsed as
TOML literals (``--set train.max_steps=100``, ``--set model.likelihood=zinb``,
``--set data.columns=["a","b"]``) and checked against the field's type, so a typo in a key
or a value fails before anything is built, naming the key.

Written by hand because the options (Hydra, OmegaConf) bring a config framework with them;
this needs only ``dataclasses``, ``tomllib`` and ``tomli_w``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from latentcell.data_pipelines.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_toml",
    "load_config",
    "parse_override",
]

T = TypeVar("T")


class ConfigError(UserInputError):
    """A config key or value that does not fit the run config's schema."""


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists, None values dropped: TOML has no null)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[field.name] = list(value)
        elif value is not None:
            out[field.name] = value
    return out


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "", base: Any = None) -> T:
    """Build ``cls`` from a (possibly partial) nested dict; missing keys keep the defaults
    (those of ``base`` when given: a section's defaults as set by its parent config)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ConfigError(
            f"unknown config key {key!r}; valid keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        field_base = _field_default(known[name]) if base is None else getattr(base, name)
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}", field_base)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid config section {where.rstrip('.') or '<root>'}: {err}") from err


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _coerce(tp: Any, value: Any, key: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} is a section; set its keys, e.g. {key}.<name>=...")
        return config_from_dict(
            tp, value, key + ".", base if dataclasses.is_dataclass(base) else None
        )
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if isinstance(value, str) and inner is str:  # --set k=a,b is the list ["a", "b"]
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(inner, v, key) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML reads nan and inf as floats
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> ``(["a", "b"], 3)``. Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as zinb or runs/vae
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b=c`` in a copy of the nested dict ``data``."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- TOML file (optional) <- ``--set`` overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    return config_from_dict(cls, apply_overrides(data, overrides))


def dump_toml(config: Any, path: str | Path) -> None:
    """Write the resolved config as TOML (atomically: temp file, then rename)."""
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(config_to_dict(config)))
    tmp.replace(path)
