"""What the HTTP service accepts as a request body: strict JSON, then a schema of exact types.

Hand-written rather than a schema library's, because the service promises exact JSON types
(``true`` is not an integer, ``2.0`` is not one either, ``null`` is never a value: leave the
key out), errors in the house's one-line form naming the exact field (``controls.counts[0][1]:
-1 is not a count. Fix: ...``), never an echo of a huge or deeply nested client value, and a
count matrix checked in one numpy pass.

``parse_json_object`` reads the body strictly (UTF-8 only; no NaN or Infinity; no duplicate
keys; too deep nesting is an error, not a crash). A route's schema is built from a few
callables, each ``check(value, field) -> the checked value``: ``Integer``, ``Number``,
``Text``, ``Choice``, ``TextMap``, ``TextList``, ``CountMatrix``, and ``Fields`` for an object
of known keys. Every failure is ``DataValidationError("request", field, problem, fix)``, which
the service answers with a 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

__all__ = [
    "MAX_COUNT",
    "MAX_LABEL_CHARS",
    "Choice",
    "CountMatrix",
    "Fields",
    "Integer",
    "Number",
    "Text",
    "TextList",
    "TextMap",
    "parse_json_object",
    "request_error",
    "show_value",
]

MAX_COUNT = 1e9  # a raw count per gene and cell; far above any real one, well inside float32
MAX_LABEL_CHARS = 1000


def request_error(field: str, problem: str, fix: str) -> DataValidationError:
    return DataValidationError("request", field, problem, fix)


def _kind(value: object) -> str:
    """The JSON name of a parsed value's type."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "an array", dict: "an object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def show_value(value: object) -> str:
    """A short, safe rendering of a client's value for an error message (containers are
    never printed: they can be huge or deeply nested)."""
    if isinstance(value, list | dict):
        n = len(value)
        return f"an empty {_kind(value)[3:]}" if not n else f"{_kind(value)} of {n} item(s)"
    text = json.dumps(value) if type(value) in (str, int, float, bool, type(None)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- strict JSON ------------------------------------------------------------------------------


def _no_constant(name: str):
    raise request_error("body", f"{name} is not JSON",
                        "send finite numbers (JSON has no NaN/Infinity)")  # fmt: skip


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise request_error("body", f"the key {show_value(key)} appears twice in one object",
                                "send each key once")  # fmt: skip
        out[key] = value
    return out


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object, strictly: UTF-8, standard JSON (no NaN, Infinity or
    duplicate keys), not nested past the interpreter's recursion limit; else a 400 error."""
    if not raw.strip():
        raise request_error("body", "empty", 'send a JSON object, e.g. {"n": 5}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise request_error("body", f"not UTF-8 (byte {err.start})",
                            "encode the body as UTF-8") from None  # fmt: skip
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except DataValidationError:
        raise
    except RecursionError:
        raise request_error(
            "body", "nested too deeply", "send the flat request the routes describe"
        ) from None
    except json.JSONDecodeError as err:
        raise request_error("body", f"not JSON ({err.msg} at line {err.lineno} column "
                            f"{err.colno})", "send valid JSON") from None  # fmt: skip
    except ValueError as err:  # e.g. an integer literal past Python's digit limit
        raise request_error("body", f"not usable JSON ({str(err)[:80]})",
                            "send valid JSON") from None  # fmt: skip
    if type(value) is not dict:
        raise request_error("body", f"{_kind(value)}, not an object",
                            'send a JSON object, e.g. {"n": 5}')  # fmt: skip
    return value


# -- the field types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Integer:
    """A JSON integer in [low, high] (``true`` and ``2.0`` are not integers)."""

    low: int
    high: int

    def __call__(self, value: object, field: str) -> int:
        fix = f"pass an integer from {self.low} to {self.high}"
        if type(value) is not int:
            raise request_error(field, f"{show_value(value)} is {_kind(value)}, not an integer",
                                fix)  # fmt: skip
        if not self.low <= value <= self.high:
            raise request_error(field, f"{show_value(value)} is out of range", fix)
        return value


@dataclass(frozen=True)
class Number:
    """A finite JSON number (integer or not, never a boolean) in [low, high]."""

    low: float
    high: float

    def __call__(self, value: object, field: str) -> float:
        fix = f"pass a number from {self.low:g} to {self.high:g}"
        if type(value) not in (int, float):
            raise request_error(field, f"{show_value(value)} is {_kind(value)}, not a number",
                                fix)  # fmt: skip
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise request_error(field, f"{show_value(value)} is out of range", fix)
        return float(value)


@dataclass(frozen=True)
class Text:
    """A non-empty JSON string of at most ``MAX_LABEL_CHARS`` characters."""

    def __call__(self, value: object, field: str) -> str:
        if type(value) is not str or not value or len(value) > MAX_LABEL_CHARS:
            what = "too long" if type(value) is str and value else "not a non-empty string"
            raise request_error(field, f"{show_value(value)} is {what}",
                                f"pass a label of 1 to {MAX_LABEL_CHARS} characters")  # fmt: skip
        return value


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def __call__(self, value: object, field: str) -> str:
        if type(value) is not str or value not in self.options:
            raise request_error(field, f"{show_value(value)} is not a choice",
                                f"use one of {json.dumps(list(self.options))}")  # fmt: skip
        return value


@dataclass(frozen=True)
class TextMap:
    """A JSON object of label -> label (at most ``max_items`` entries)."""

    example: str
    max_items: int = 64

    def __call__(self, value: object, field: str) -> dict[str, str]:
        if type(value) is not dict:
            raise request_error(field, f"{show_value(value)} is {_kind(value)}, not an object",
                                f"pass an object of strings, e.g. {self.example}")  # fmt: skip
        if len(value) > self.max_items:
            raise request_error(field, f"{len(value)} entries", f"pass at most {self.max_items}")
        for key, item in value.items():
            Text()(key, f"{field} (a key)")
            Text()(item, f"{field}.{key[:60]}")
        return dict(value)


@dataclass(frozen=True)
class TextList:
    """A non-empty JSON array of distinct labels (at most ``max_items``)."""

    example: str
    max_items: int

    def __call__(self, value: object, field: str) -> list[str]:
        fix = f"pass a non-empty array of distinct strings, e.g. {self.example}"
        if type(value) is not list or not value:
            raise request_error(field, f"{show_value(value)} is not a non-empty array", fix)
        if len(value) > self.max_items:
            raise request_error(field, f"{len(value)} items", f"pass at most {self.max_items}")
        for i, item in enumerate(value):
            Text()(item, f"{field}[{i}]")
        seen: set[str] = set()
        for item in value:
            if item in seen:
                raise request_error(field, f"{show_value(item)} is listed twice", fix)
            seen.add(item)
        return list(value)


@dataclass(frozen=True)
class CountMatrix:
    """A rectangular, non-empty JSON array of rows of raw counts: numbers (not booleans),
    finite, from 0 to ``MAX_COUNT``; at most ``max_rows`` rows."""

    max_rows: int

    def __call__(self, value: object, field: str) -> np.ndarray:
        fix = "pass one array of counts per cell, every row as long, e.g. [[0, 3, 1], [2, 0, 0]]"
        if type(value) is not list or not value:
            raise request_error(field, f"{show_value(value)} is not a non-empty array of rows",
                                fix)  # fmt: skip
        if len(value) > self.max_rows:
            raise request_error(field, f"{len(value)} rows", f"send at most {self.max_rows} cells")
        width = len(value[0]) if type(value[0]) is list else 0
        for i, row in enumerate(value):
            if type(row) is not list or not row:
                raise request_error(f"{field}[{i}]", f"{show_value(row)} is not a non-empty "
                                    "array", fix)  # fmt: skip
            if len(row) != width:
                raise request_error(f"{field}[{i}]", f"{len(row)} values, row 0 has {width}", fix)
            if not set(map(type, row)) <= {int, float}:
                j, bad = next((j, x) for j, x in enumerate(row) if type(x) not in (int, float))
                raise request_error(f"{field}[{i}][{j}]", f"{show_value(bad)} is {_kind(bad)}",
                                    fix)  # fmt: skip
        try:
            counts = np.asarray(value, dtype=np.float64)
        except OverflowError as err:  # an integer beyond float range
            raise request_error(
                field, "a value is too large", f"counts are at most {MAX_COUNT:g}"
            ) from err
        bad = ~np.isfinite(counts) | (counts < 0) | (counts > MAX_COUNT)
        if bad.any():
            i, j = (int(k) for k in np.argwhere(bad)[0])
            raise request_error(f"{field}[{i}][{j}]", f"{show_value(value[i][j])} is not a count",
                                f"counts are finite numbers from 0 to {MAX_COUNT:g}")  # fmt: skip
        return counts.astype(np.float32)


@dataclass(frozen=True)
class Fields:
    """A JSON object with known keys: ``specs`` maps each key to its check; ``required``
    keys must be present; any other key is an error naming it. Returns the checked values
    of the keys present (absent optional keys are absent, never null)."""

    specs: dict[str, Callable[[object, str], object]]
    required: tuple[str, ...] = ()

    def __call__(self, value: object, field: str = "") -> dict:
        def name(key: str) -> str:
            return f"{field}.{key}" if field else key

        where = field or "body"
        if type(value) is not dict:
            raise request_error(where, f"got {show_value(value)}, not an object",
                                "send a JSON object")  # fmt: skip
        unknown = [k for k in value if k not in self.specs]
        if unknown:
            names = ", ".join(show_value(k) for k in unknown[:5])
            raise request_error(where, f"unknown key(s) {names}",
                                f"the keys are {list(self.specs)}")  # fmt: skip
        missing = [k for k in self.required if k not in value]
        if missing:
            raise request_error(name(missing[0]), "missing",
                                f"the required keys are {list(self.required)}")  # fmt: skip
        out = {}
        for key, item in value.items():
            if item is None:
                raise request_error(name(key), "is null",
                                    "leave the key out for the default, or give a value")  # fmt: skip
            out[key] = self.specs[key](item, name(key))
        return out
