"""Library sizes (and decoder batches) for generated cells, from the training statistics.

Plain numpy (no torch): ``latentcell generate`` and the torch-free ONNX runtime draw depths
from the same code and the same ``latent_stats.json`` numbers (written by
``trainer/latent_stats.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LIBRARY_MODES", "LibraryModel"]

LIBRARY_MODES = ("latent", "condition")


class LibraryModel:
    """Draws library sizes and decoder batches for generated cells.

    ``mode="latent"`` (default): log library ~ Normal(intercept + coef . z, residual_std) from
    the group's ``latent_fit``, so each cell's depth follows its generated latent ``z``; the
    mean is clipped to the group's mean +- 3 sd, which keeps latents far outside the training
    range from asking for absurd depths. ``mode="condition"``: the group's plain log-normal,
    independent of ``z``. A group without a latent fit (too few cells, or statistics written
    before fits existed) uses its plain log-normal. A combination seen in training with fewer
    than ``min_cells`` cells, or a row with a null condition, falls back to the pooled
    (global) distribution.
    """

    def __init__(self, library: dict, min_cells: int = 10, mode: str = "latent") -> None:
        if mode not in LIBRARY_MODES:
            raise ValueError(f"library mode must be one of {LIBRARY_MODES}, got {mode!r}")
        self.mode = mode
        self.columns = list(library["columns"])
        self.batch_column = library["batch_column"]
        self.fallback = library["global"]
        self.groups = {tuple(g["codes"]): g for g in library["groups"] if g["n_cells"] >= min_cells}

    def _group(self, codes: Sequence[int]) -> dict:
        return self.groups.get(tuple(int(c) for c in codes), self.fallback)

    def _log_library(self, g: dict, z: np.ndarray | None, n: int, rng) -> np.ndarray:
        fit = g.get("latent_fit") if self.mode == "latent" else None
        if fit is None or z is None:
            return rng.normal(g["log_mean"], g["log_std"], n)
        mean = fit["intercept"] + np.asarray(z, dtype=np.float64) @ np.asarray(fit["coef"])
        spread = 3 * g["log_std"]
        mean = np.clip(mean, g["log_mean"] - spread, g["log_mean"] + spread)
        return mean + fit["residual_std"] * rng.standard_normal(n)

    def sample(
        self, codes: np.ndarray, rng: np.random.Generator, z: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(library sizes (n,), batch codes (n,)) for rows of categorical ``codes`` (n, k)
        and, in latent mode, their latents ``z`` (n, d) in the VAE's own coordinates."""
        n = codes.shape[0]
        library = np.empty(n, dtype=np.float32)
        batch = np.zeros(n, dtype=np.int64)
        keys = [tuple(row) for row in codes.tolist()]
        for key in set(keys):
            rows = np.flatnonzero([k == key for k in keys])
            g = self._group(key)
            part = None if z is None else z[rows]
            library[rows] = np.exp(self._log_library(g, part, len(rows), rng))
            p = np.asarray(g["batch_counts"], dtype=np.float64)
            batch[rows] = rng.choice(len(p), size=len(rows), p=p / p.sum())
        return np.maximum(np.round(library), 1.0), batch
