"""An evaluation logged to the MLflow run of the training run it judges.

``latentcell evaluate generation|perturbation --run RUN_DIR`` puts the evaluation folder
(``summary.json``, the figures, cell-eval's csv files) under ``evaluation/<kind>/`` of the run
named in ``RUN_DIR/summary.json`` and its headline numbers in tags ``eval/<kind>/<metric>``,
so ``mlflow ui`` shows the training curves and the held-out verdict (the three-panel
scoreboard figure of a perturbation run, the PCA of a DiT's cells) in one place. Artifacts and
tags only, through the client: the run's status and end time stay as training left them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["log_evaluation", "tracked_run"]


def tracked_run(run_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of a finished training run, or one error line."""
    summary = Path(run_dir) / "summary.json"
    try:
        tracking = json.loads(summary.read_text()).get("mlflow") or {}
    except (OSError, ValueError) as exc:
        raise DataValidationError(summary, "--run", f"not a finished training run ({exc})",
                                  "pass the run.dir of a finished `latentcell train`") from None  # fmt: skip
    if not tracking.get("run_id") or not tracking.get("tracking_uri"):
        raise DataValidationError(summary, "mlflow", "the run was not tracked in MLflow",
                                  "train with tracking.enabled=true, or drop --run")  # fmt: skip
    return tracking["tracking_uri"], tracking["run_id"]


def log_evaluation(run_dir: str | Path, kind: str, out_dir: str | Path,
                   headline: Mapping[str, float | None]) -> str:  # fmt: skip
    """Log ``out_dir`` and the headline numbers to the run's MLflow run; its artifact URI."""
    from mlflow.tracking import MlflowClient

    uri, run_id = tracked_run(run_dir)
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(out_dir), f"evaluation/{kind}")
    for name, value in headline.items():
        if value is not None:
            client.set_tag(run_id, f"eval/{kind}/{name}", f"{float(value):.6g}")
    return f"runs:/{run_id}/evaluation/{kind}"
