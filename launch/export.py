"""``latentcell export``: a finished run -> an ONNX bundle, logged to the run's MLflow run.

    latentcell export --run DIR --out BUNDLE [--opset 20] [--weights auto|ema|model]
                      [--add-perturbations A+B,C+D] [--register NAME] [--no-mlflow]
                      [--overwrite]

Then, without torch: ``python -m latentcell.export.runtime generate|predict|serve --bundle
BUNDLE ...``.
"""

from __future__ import annotations

import argparse
import time


def add_export_command(sub: argparse._SubParsersAction) -> None:
    from latentcell.families import FAMILIES

    exporting = ", ".join(name for name, f in FAMILIES.items() if f.exporter)
    p = sub.add_parser(
        "export", help="export a trained run to ONNX (+ metadata) for serving",
        description=f"Export a finished run to an ONNX bundle. Families that export: {exporting}.",
    )  # fmt: skip
    p.add_argument("--run", required=True,
                   help=f"run.dir of a finished `latentcell train` run ({exporting})")  # fmt: skip
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (>= 18; default 20)")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "model"))
    p.add_argument(
        "--add-perturbations", default="",
        help="set models with a gene_table/external encoder: new combinations of trained genes "
        "to include in the vocabulary (comma-separated, e.g. A+B,C+D)",
    )  # fmt: skip
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also register the bundle in the MLflow model registry as NAME")  # fmt: skip
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not log the bundle to the run's MLflow run")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--json", action="store_true", help="end with one JSON summary line")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import contextlib
    import io
    import warnings

    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.export.exporters import export_run

    if args.opset < 18:
        raise DataValidationError("--opset", str(args.opset), "opset 17 and older produce "
                                  "models onnxruntime refuses", "pass --opset 18 or newer")  # fmt: skip
    if args.register and args.no_mlflow:
        raise DataValidationError("--register", args.register, "registering needs MLflow",
                                  "drop --no-mlflow")  # fmt: skip
    if args.register:  # fail before exporting, not after
        from pathlib import Path

        from latentcell.export.exporters import run_tracking

        if not run_tracking(Path(args.run))["mlflow_run_id"]:
            raise DataValidationError(
                args.run, "--register", "the run was not tracked in MLflow, so there is no run "
                "to log the bundle to", "train with tracking.enabled=true, or drop --register",
            )  # fmt: skip
    start = time.perf_counter()
    extra = [x.strip() for x in args.add_perturbations.split(",") if x.strip()]
    # torch.onnx prints its progress and warns about internals: keep the command's output to
    # its one JSON line (errors still raise).
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        metadata = export_run(args.run, args.out, args.opset, args.weights, extra, args.overwrite)
    summary = {
        "out": args.out, "kind": metadata["kind"],
        "max_rel_error": {k: v["parity"]["max_rel_error"] for k, v in metadata["components"].items()},
        "mlflow": None,
    }  # fmt: skip
    tracked = metadata["source"].get("mlflow_run_id")
    if not args.no_mlflow and (tracked or args.register):
        from latentcell.export.mlflow_model import log_bundle

        summary["mlflow"] = log_bundle(args.out, metadata, args.register)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    from latentcell.launch.next_steps import after_export, finish

    finish(summary, after_export(summary), args.json)
    return 0
