"""Running per-cell means of a model's metrics, reduced over processes only when logged.

Sums stay on the device between logs (no host sync per step); one ``accelerator.reduce`` of
a single stacked tensor per log gives every process the same cell-weighted means, padding
cells excluded (outputs carry their real-cell count).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

__all__ = ["MetricAverager"]


class MetricAverager:
    def __init__(self) -> None:
        self._names: list[str] | None = None
        self._sums: torch.Tensor | None = None
        self._cells: torch.Tensor | None = None

    def add(self, metrics: dict[str, torch.Tensor | float], n_cells: torch.Tensor) -> None:
        names = sorted(metrics)
        weight = n_cells.detach().to(torch.float64)
        values = torch.stack(
            [torch.as_tensor(metrics[k], device=weight.device).detach().double() for k in names]
        )
        if self._names is None:
            self._names = names
            self._sums = torch.zeros_like(values)
            self._cells = torch.zeros((), dtype=torch.float64, device=weight.device)
        elif names != self._names:
            raise ValueError(f"metric names changed between steps: {self._names} -> {names}")
        self._sums += values * weight
        self._cells += weight

    def reduce(self, accelerator: Accelerator) -> tuple[dict[str, float], float]:
        """(cell-weighted means over all processes, total real cells) and reset."""
        if self._names is None:
            return {}, 0.0
        packed = torch.cat([self._sums, self._cells.reshape(1)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        packed = packed.cpu()
        cells = float(packed[-1])
        means = {
            k: float(v) / max(cells, 1.0) for k, v in zip(self._names, packed[:-1], strict=True)
        }
        self._names = self._sums = self._cells = None
        return means, cells
