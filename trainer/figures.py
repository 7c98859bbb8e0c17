"""The training-curve figure every run logs (loss and validation metrics against step), and
the figures stages add (``Stage.final_figures``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_latent_pca", "plot_training_curves", "read_metrics"]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {name: [(step, value)]}; a resumed run's repeated steps keep the
    latest record."""
    by_step: dict[int, dict[str, float]] = {}
    if not Path(path).exists():
        return {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(int(record.pop("step")), {}).update(record)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            series.setdefault(name, []).append((step, float(value)))
    return series


def plot_training_curves(metrics_path: Path, out: Path) -> Path | None:
    """Training loss, and every ``val*/`` metric sharing the loss's name, in one PNG."""
    series = read_metrics(metrics_path)
    panels = [k for k in ("train/loss", "train/reconstruction", "train/kl") if k in series]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        metric = name.split("/", 1)[1]
        for key in (name, f"val/{metric}", f"val_ema/{metric}"):
            if key in series:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, marker="." if key != name else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_latent_pca(real: dict, generated: dict, out: Path) -> Path:
    """Real and generated cells per label (``{label: (n, d) array}``) on PC1/PC2 of all the
    real cells together: one projection for every panel, so the panels compare."""
    import numpy as np

    from latentcell.evaluation.figures import plot_pca_panels

    pooled = np.concatenate([np.asarray(x, dtype=np.float64) for x in real.values()])
    mean = pooled.mean(axis=0)
    axes = np.linalg.svd(pooled - mean, full_matrices=False)[2][:2].T

    def project(cells: dict) -> dict:
        return {k: (np.asarray(v, dtype=np.float64) - mean) @ axes for k, v in cells.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    plot_pca_panels(project(real), project(generated), out)
    return out
