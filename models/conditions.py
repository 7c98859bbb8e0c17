"""``--condition k=v`` requests -> the codes and values a conditional generator takes.

Plain numpy (no torch): ``latentcell generate`` and the torch-free ONNX runtime resolve the
same requests to the same rows, with the same errors. A ``ConditionSpace`` is what a trained
latent-diffusion run conditions on (its categorical columns and labels, its continuous
columns and their training mean/std, the store's role names, the VAE decoder's batch
column); a run's model card and a bundle's metadata both describe one.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["ConditionRows", "ConditionSpace", "parse_conditions"]

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class ConditionRows:
    """Per requested cell: DiT codes (n, k) with ``n_categories[k]`` as the null, standardized
    values (n, m) with NaN as the null, decoder batch codes (n,) or -1 (draw one), and the obs
    columns to write (``obs``: column -> labels or numbers; ``categories``: the label order of
    each categorical one)."""

    codes: np.ndarray
    values: np.ndarray
    batch: np.ndarray
    obs: dict[str, np.ndarray]
    categories: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.codes)

    def obs_frame(self):
        """The obs as a DataFrame, one row per cell, categorical condition columns."""
        import pandas as pd

        obs = pd.DataFrame(index=[f"gen-{i}" for i in range(len(self))])
        for column, values in self.obs.items():
            if column in self.categories:
                obs[column] = pd.Categorical(values, self.categories[column])
            else:
                obs[column] = values
        return obs

    def take(self, rows: slice) -> ConditionRows:
        obs = {k: v[rows] for k, v in self.obs.items()}
        return ConditionRows(
            self.codes[rows], self.values[rows], self.batch[rows], obs, self.categories
        )


@dataclass(frozen=True)
class ConditionSpace:
    """source: what errors name (a run or a bundle directory)."""

    source: str
    categories: dict[str, list[str]]
    continuous: tuple[str, ...] = ()
    continuous_mean: tuple[float, ...] = ()
    continuous_std: tuple[float, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)
    batch_column: str | None = None
    batch_labels: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["source"]
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ConditionSpace:
        return cls(
            source=source,
            categories={k: list(v) for k, v in data["categories"].items()},
            continuous=tuple(data["continuous"]),
            continuous_mean=tuple(data["continuous_mean"]),
            continuous_std=tuple(data["continuous_std"]),
            roles=dict(data["roles"]),
            batch_column=data["batch_column"],
            batch_labels=tuple(data["batch_labels"]),
        )

    def column(self, key: str) -> str:
        """The column a request key names: a condition column, a role name, or the batch."""
        column = key if key in (*self.categories, *self.continuous) else self.roles.get(key, key)
        if column in self.categories or column in self.continuous or column == self.batch_column:
            return column
        known = sorted(
            {
                *self.categories,
                *self.continuous,
                *(r for r in self.roles if self.roles[r] in self.categories),
            }
        )
        raise DataValidationError(
            self.source, f"--condition {key}", "not a condition of this model",
            f"use one of {known}" + (f" or {self.batch_column}" if self.batch_column else ""),
        )  # fmt: skip

    def _labels(self, column: str) -> list[str]:
        return self.categories.get(column) or list(self.batch_labels)

    def label_code(self, column: str, label: str) -> int:
        labels = self._labels(column)
        if label not in labels:
            raise DataValidationError(
                self.source, f"--condition {column}={label}", "unknown label",
                f"use one of {labels[:20]}{' ...' if len(labels) > 20 else ''}",
            )  # fmt: skip
        return labels.index(label)

    def _expand(self, key: str, value: str) -> tuple[str, list[str]]:
        column = self.column(key)
        if value != "*":
            return column, [value]
        if column == self.batch_column and column not in self.categories:
            return column, list(self.batch_labels)
        if column not in self.categories:
            raise DataValidationError(
                self.source, f"--condition {key}=*", "'*' needs a categorical condition",
                "give a value",
            )  # fmt: skip
        return column, list(self.categories[column])

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.continuous_mean, dtype=np.float32)
        std = np.asarray(self.continuous_std, dtype=np.float32)
        return ((raw - mean) / std).astype(np.float32)

    def rows(self, n: int, conditions: dict[str, str]) -> ConditionRows:
        """``n`` cells for each combination the conditions describe (``k=*``: every label of
        column k, so ``cell_type=*`` gives n cells of every cell type); no condition: the
        unconditional model."""
        resolved = dict(self._expand(k, v) for k, v in conditions.items())
        combos = list(itertools.product(*resolved.values()))  # one () without conditions
        total = n * len(combos)
        columns = {
            c: np.repeat(np.asarray([combo[i] for combo in combos], dtype=object), n)
            for i, c in enumerate(resolved)
        }
        codes = np.tile(
            np.asarray([len(v) for v in self.categories.values()], np.int64), (total, 1)
        )
        obs: dict[str, np.ndarray] = {}
        categories: dict[str, list[str]] = {}
        for k, column in enumerate(self.categories):
            if column in columns:
                codes[:, k] = [self.label_code(column, v) for v in columns[column]]
                obs[column] = columns[column].astype(str)
                categories[column] = list(self.categories[column])
        raw = np.full((total, len(self.continuous)), np.nan, dtype=np.float32)
        for k, column in enumerate(self.continuous):
            if column in columns:
                try:
                    values = columns[column].astype(np.float64)
                except ValueError as err:
                    raise DataValidationError(
                        self.source, f"--condition {column}", "needs a number", "e.g. 0.5"
                    ) from err
                # NaN is the null ("not conditioned on"), and inf or a value past float32's
                # range would become inf: all fail this comparison
                if not (np.abs(values) <= FLOAT32_MAX).all():
                    raise DataValidationError(
                        self.source, f"--condition {column}",
                        f"needs a finite number, got {columns[column][0]}",
                        f"e.g. 0.5 (at most {FLOAT32_MAX:.1e} in size: values are float32)",
                    )  # fmt: skip
                raw[:, k] = values
                obs[column] = raw[:, k].copy()
        batch = np.full(total, -1, dtype=np.int64)
        if self.batch_column and self.batch_column in columns:
            batch[:] = [self.label_code(self.batch_column, v) for v in columns[self.batch_column]]
        return ConditionRows(codes, self.standardize(raw), batch, obs, categories)


def parse_conditions(items: list[str]) -> dict[str, str]:
    """``["cell_type=B", "time=0.5"]`` (repeated ``--condition`` arguments) -> a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataValidationError(
                item, "--condition", "must look like KEY=VALUE", "e.g. --condition cell_type=B"
            )
        out[key.strip()] = value.strip()
    return out
