"""``python -m latentcell.export.runtime generate|predict|serve``: the torch-free commands.

    generate --bundle DIR --n N [--condition k=v ...] [--steps K --guidance S --seed S]
             --out GEN.h5ad
    predict  --bundle DIR --controls CTRL.h5ad --perturbations A,B|all
             [--cells-per-perturbation N --unseen error|generic --seed S] --out PRED.h5ad
    serve    --bundle DIR [--host 127.0.0.1 --port 8000]

Bad input prints one ``error:`` line naming the file, the field and the fix, exits 2, and
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.conditions import parse_conditions

from .bundle import Bundle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m latentcell.export.runtime",
        description="Generate or predict cells from an ONNX bundle (numpy + onnxruntime).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="generate cells from a generation bundle (h5ad)")
    g.add_argument("--bundle", required=True)
    g.add_argument("--n", type=int, required=True, help="cells per condition combination")
    g.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE",
                   help="a condition (obs column or role name); VALUE * means every label")  # fmt: skip
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--library", default="latent", choices=("latent", "condition"))
    g.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    g.set_defaults(func=run_generate)
    p = sub.add_parser("predict", help="predict perturbed cells from controls (h5ad)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--controls", required=True, help="h5ad holding control cells (counts)")
    p.add_argument("--perturbations", required=True, help="'all' or comma-separated labels")
    p.add_argument("--cells-per-perturbation", type=int, default=100)
    p.add_argument("--unseen", default="error", choices=("error", "generic"))
    p.add_argument("--pert-col", default=None, help="perturbation column (default: the run's)")
    p.add_argument("--cell-type-col", default=None, help="cell type column (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.set_defaults(func=run_predict)
    s = sub.add_parser("serve", help="serve generate/predict as JSON over HTTP")
    s.add_argument("--bundle", required=True)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    s.set_defaults(func=run_serve)
    return parser


def run_generate(args) -> int:
    from latentcell.data_pipelines.atomic import write_h5ad_atomic

    from .generate import OnnxGenerator

    start = time.perf_counter()
    generator = OnnxGenerator(Bundle.load(args.bundle), args.library)
    cells = generator.generate(
        args.n, parse_conditions(args.condition), args.steps, args.guidance, args.seed
    )
    out = write_h5ad_atomic(cells.to_anndata(), args.out)
    print(json.dumps({"out": str(out), "n_cells": len(cells.counts),
                      "n_genes": cells.counts.shape[1],
                      "seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip
    return 0


def run_predict(args) -> int:
    import anndata as ad

    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.trainer.predict import PopulationRequest, predict_population

    from .predict import OnnxSetPredictor

    start = time.perf_counter()
    predictor = OnnxSetPredictor(Bundle.load(args.bundle), args.unseen)
    settings = predictor.settings
    controls = ad.read_h5ad(args.controls)
    if args.perturbations == "all":
        wanted = [x for x in predictor.labels
                  if x != settings["control_label"] and predictor.is_trained(x)]  # fmt: skip
    else:
        wanted = [x.strip() for x in args.perturbations.split(",") if x.strip()]
    request = PopulationRequest(
        perturbations=tuple(wanted),
        cells_per_perturbation=args.cells_per_perturbation,
        pert_col=args.pert_col or settings["pert_col"] or "target_gene",
        control_label=settings["control_label"],
        cell_type_col=args.cell_type_col or settings["cell_type_col"],
        seed=args.seed,
    )
    pred = predict_population(predictor, controls, request, args.controls)
    write_h5ad_atomic(pred, args.out)
    print(json.dumps({"out": args.out, "n_cells": pred.n_obs, "n_perturbations": len(wanted),
                      "seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip
    return 0


def run_serve(args) -> int:
    from .service import serve

    serve(Bundle.load(args.bundle, threads=args.threads), args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DataValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
