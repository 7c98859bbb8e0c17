"""How a command ends: where its outputs are and the natural next command, in a few lines.

``train``, ``export``, ``generate`` and ``predict`` end with these lines on stdout; with
``--json`` they print their one JSON summary line instead (for scripts). The next command is
the one a user would type next: a VAE run -> a DiT on its latents or an export; a DiT run ->
generate or export; a perturbation run -> predict or export; a bundle -> the torch-free
runtime (generate / predict / serve); cells -> ``evaluate``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

__all__ = [
    "after_export",
    "after_generate",
    "after_predict",
    "after_train",
    "after_translate",
    "finish",
]

CLI = "latentcell"
RUNTIME = "python -m latentcell.export.runtime"
SERVED_PREDICTIONS = ("prediction",)  # bundle kinds the HTTP service predicts with
RUNTIME_PREDICTIONS = ("cvae", "latent-delta", "masked-diffusion")  # runtime `predict` only
FINE_TUNED_BY = {"st-pretrain": "st", "masked-diffusion-pretrain": "masked-diffusion"}


def _q(path) -> str:
    return shlex.quote(str(path))


def finish(summary: Mapping, lines: list[str], as_json: bool) -> None:
    """Print the JSON summary (``--json``) or the human lines."""
    print(json.dumps(summary) if as_json else "\n".join(lines), flush=True)


def _mlflow_line(uri: str | None) -> list[str]:
    if not uri:
        return []
    if uri.startswith("sqlite:///"):
        return [f"  review: mlflow ui --backend-store-uri {_q(uri)}"]
    return [f"  review: MLflow at {uri}"]


def after_train(family: str, summary: Mapping) -> list[str]:
    run = summary["run_dir"]
    head = f"trained {family}: {run}"
    if "step" in summary:
        head += f" ({summary['step']} steps"
        val = summary.get("val") or {}
        loss = next((v for k, v in val.items() if k.endswith("loss")), None)
        if loss is not None:
            head += f", validation loss {loss:.4g}"
        if summary.get("cells_per_s"):
            head += f", {summary['cells_per_s']:,.0f} cells/s"
        head += ")"
    lines = [head]
    if summary.get("final_weights"):
        lines.append(f"  weights: {summary['final_weights']}")
    lines += _mlflow_line(summary.get("mlflow_tracking_uri"))
    from latentcell.families import FAMILIES

    bundle = f"{str(run).rstrip('/')}_bundle"
    entry = FAMILIES.get(family)
    if family == "vae":
        lines.append(f"next: {CLI} train dit --set vae.run={_q(run)}")
    elif family == "dit":
        lines.append(f"next: {CLI} generate --run {_q(run)} --n 100 --out generated.h5ad")
    elif family in FINE_TUNED_BY:
        lines.append(f"next: {CLI} train {FINE_TUNED_BY[family]} --set init.run={_q(run)} "
                     "--set data.path=STORE")  # fmt: skip
    elif entry is not None and entry.translator:
        lines.append(f"next: {CLI} predict --run {_q(run)} --cells CELLS.h5ad --to protein "
                     "--out translated.h5ad")  # fmt: skip
    elif entry is not None and entry.predicts_perturbations:
        lines.append(
            f"next: {CLI} predict --run {_q(run)} --controls CONTROLS.h5ad "
            "--perturbations all --cells-per-perturbation 100 --out predicted.h5ad"
        )
    if entry is None or entry.exporter is not None:
        lines.append(f"  or: {CLI} export --run {_q(run)} --out {_q(bundle)}")
    return lines


def after_export(summary: Mapping) -> list[str]:
    out = summary["out"]
    errors = summary.get("max_rel_error") or {}
    worst = max(errors.values(), default=0.0)
    lines = [
        f"exported {summary['kind']} bundle: {out} ({len(errors)} ONNX graphs, "
        f"largest relative error against torch {worst:.1e}, {summary['seconds']} s)"
    ]
    logged = summary.get("mlflow") or {}
    if logged:
        where = f"  MLflow: {logged.get('model_uri') or logged.get('artifacts')}"
        if logged.get("registered"):
            reg = logged["registered"]
            where += f" (registered as {reg['name']} version {reg['version']})"
        lines.append(where)
    kind = summary["kind"]
    if kind == "generation":
        lines.append(f"next: {RUNTIME} generate --bundle {_q(out)} --n 100 --out generated.h5ad")
    elif kind in SERVED_PREDICTIONS + RUNTIME_PREDICTIONS:
        lines.append(
            f"next: {RUNTIME} predict --bundle {_q(out)} --controls CONTROLS.h5ad "
            "--perturbations all --out predicted.h5ad"
        )
    elif kind == "multiomics":
        lines.append(f"next: {RUNTIME} translate --bundle {_q(out)} --cells CELLS.h5ad "
                     "--to protein --out translated.h5ad")  # fmt: skip
    else:  # an autoencoder or a pretrained set model: graphs for the user's own code
        lines.append(f"next: load {_q(out)}/*.onnx in an onnxruntime session "
                     "(metadata.json names every input and output)")  # fmt: skip
    if kind in ("generation", *SERVED_PREDICTIONS):
        lines.append(f"  or: {RUNTIME} serve --bundle {_q(out)} --port 8000")
    return lines


def after_generate(summary: Mapping) -> list[str]:
    out = summary["out"]
    return [
        f"wrote {summary['n_cells']:,} generated cells to {out}",
        f"next: {CLI} evaluate generation --generated {_q(out)} --real REAL.h5ad "
        "--condition-col COLUMN --out evaluation/",
    ]


def after_predict(summary: Mapping) -> list[str]:
    out = summary["out"]
    what = f"{summary['n_cells']:,} cells"
    if "n_perturbations" in summary:
        what += f" for {summary['n_perturbations']} perturbations"
    return [
        f"wrote {what} to {out}",
        f"next: {CLI} evaluate perturbation --pred {_q(out)} --real REAL.h5ad "
        "--train TRAIN.h5ad --out evaluation/",
    ]


def after_translate(summary: Mapping) -> list[str]:
    out, to, where = summary["out"], summary["to"], summary["field"]
    return [
        f"wrote {summary['n_cells']:,} cells with {summary['n_features']:,} predicted "
        f"{'protein' if to == 'protein' else 'RNA'} features ({where}) to {out}",
        f"next: compare with measured cells, or {CLI} benchmark multiomics --data CELLS.h5ad "
        "--out DIR for held-out accuracy beside ridge regression",
    ]
