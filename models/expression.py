"""The expression scale every model shares, in plain numpy (no torch).

log1p of counts scaled to 1e4 per cell is the models' feature space; ``to_counts`` goes back
to integer counts at a cell's library size (see ``trainer/predict.py`` for why the rounding
happens in log1p space). The torch-free ONNX runtime uses the same two functions, so a
service writes the same files as ``latentcell predict``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TARGET_SUM", "log1p_normalize", "to_counts"]

TARGET_SUM = 1e4


def log1p_normalize(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    """log1p of counts scaled to ``TARGET_SUM`` per cell (the models' input scale)."""
    scale = TARGET_SUM / np.maximum(np.asarray(library, dtype=np.float64), 1.0)
    return np.log1p(counts * scale[:, None]).astype(np.float32)


def to_counts(log1p: np.ndarray, library: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts at ``library`` per cell from log1p-normalized expression (see the module
    docstring): k or k + 1 around expm1(x) / s, unbiased for log1p(count * s), s = 1e4 /
    library."""
    x = np.clip(log1p, 0, None).astype(np.float64)
    per_unit = np.maximum(np.asarray(library, dtype=np.float64), 1.0)[:, None] / TARGET_SUM
    k = np.floor(np.expm1(x) * per_unit)
    low, high = np.log1p(k / per_unit), np.log1p((k + 1) / per_unit)
    up = np.clip((x - low) / (high - low), 0.0, 1.0)
    return (k + (rng.random(x.shape) < up)).astype(np.float32)
