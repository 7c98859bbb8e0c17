"""``python -m latentcell.export.runtime generate|predict|translate|serve``: the torch-free
commands.

    generate --bundle DIR --n N [--condition k=v ...] [--steps K --guidance S --seed S]
             --out GEN.h5ad
    predict  --bundle DIR --controls CTRL.h5ad --perturbations A,B|all
             [--cells-per-perturbation N --unseen error|generic --unseen-cell-type error|unknown
              --mode b|a (cvae bundles) | sampled|deterministic [--steps K --guidance W]
              (latent-delta bundles) | [--steps K --guidance W] (masked-diffusion bundles)
              --seed S] --out PRED.h5ad
    translate --bundle DIR --cells CELLS.h5ad --to protein|rna [--protein-key KEY]
             --out OUT.h5ad   (multiomics bundles; the file ``latentcell predict --to`` writes)
    serve    --bundle DIR [--host 127.0.0.1 --port 8000 --max-body-bytes N --read-timeout S
             --concurrency N --queue N --max-connections N --workers N]

Bad input prints one ``error:`` line naming the file, the field and the fix, exits 2, and
writes nothing (``errors.run_cli``; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from latentcell.data_pipelines.errors import debug_requested, run_cli
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
    g.add_argument("--json", action="store_true", help="print one JSON summary line")
    g.set_defaults(func=run_generate)
    p = sub.add_parser("predict", help="predict perturbed cells from controls (h5ad)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--controls", required=True, help="h5ad holding control cells (counts)")
    p.add_argument("--perturbations", required=True, help="'all' or comma-separated labels")
    p.add_argument("--cells-per-perturbation", type=int, default=100)
    p.add_argument("--unseen", default="error", choices=("error", "generic"))
    p.add_argument("--unseen-cell-type", default="error", choices=("error", "unknown"))
    p.add_argument("--mode", default=None, choices=("b", "a", "sampled", "deterministic"),
                   help="cvae bundles: b re-decodes each control, a decodes prior draws; "
                   "latent-delta bundles: sampled (default) or deterministic")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (latent-delta bundles in --mode sampled, "
                   "masked-diffusion bundles)")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance on the perturbation (latent-delta bundles in --mode sampled, "
                   "masked-diffusion bundles)")  # fmt: skip
    p.add_argument("--pert-col", default=None, help="perturbation column (default: the run's)")
    p.add_argument("--cell-type-col", default=None, help="cell type column (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    p.set_defaults(func=run_predict)
    t = sub.add_parser("translate", help="translate cells between RNA and protein with a "
                       "multiomics bundle (h5ad)")  # fmt: skip
    t.add_argument("--bundle", required=True)
    t.add_argument("--cells", required=True, help="h5ad: RNA counts in X (--to protein) or "
                   "protein counts in obsm (--to rna)")  # fmt: skip
    t.add_argument("--to", required=True, choices=("protein", "rna"))
    t.add_argument("--protein-key", default=None,
                   help="obsm key of the protein counts (default: the run's)")  # fmt: skip
    t.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    t.add_argument("--json", action="store_true", help="print one JSON summary line")
    t.set_defaults(func=run_translate)
    s = sub.add_parser("serve", help="serve generate/predict as JSON over HTTP (uvicorn)")
    s.add_argument("--bundle", required=True)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    s.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                   help="larger request bodies get 413 (default 16 MiB)")  # fmt: skip
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds for a request's head, and for its body, to arrive (else 408)")  # fmt: skip
    s.add_argument("--concurrency", type=int, default=2, help="requests computed at once")
    s.add_argument("--queue", type=int, default=8,
                   help="requests that may wait for compute; more get 503")  # fmt: skip
    s.add_argument("--max-connections", type=int, default=64,
                   help="open connections plus running requests (uvicorn limit_concurrency)")  # fmt: skip
    s.add_argument(
        "--workers", type=int, default=1, help="server processes (each loads the bundle)"
    )
    s.set_defaults(func=run_serve)
    return parser


def _finish(args, summary: dict, line: str) -> None:
    """One human line (with the time), or the JSON summary with ``--json``."""
    print(json.dumps(summary) if args.json else f"{line} ({summary['seconds']} s)", flush=True)


def run_generate(args) -> int:
    from latentcell.data_pipelines.atomic import write_h5ad_atomic

    from .generate import OnnxGenerator

    start = time.perf_counter()
    generator = OnnxGenerator(Bundle.load(args.bundle), args.library)
    cells = generator.generate(
        args.n, parse_conditions(args.condition), args.steps, args.guidance, args.seed
    )
    out = write_h5ad_atomic(cells.to_anndata(), args.out)
    summary = {"out": str(out), "n_cells": len(cells.counts), "n_genes": cells.counts.shape[1],
               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    _finish(args, summary, f"wrote {summary['n_cells']:,} generated cells to {out}")
    return 0


def run_predict(args) -> int:
    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.data_pipelines.errors import DataValidationError
    from latentcell.data_pipelines.read_h5ad import read_h5ad
    from latentcell.inference.predict import PopulationRequest, predict_population

    from .predict import OnnxSetPredictor

    start = time.perf_counter()
    bundle = Bundle.load(args.bundle)
    sampling = [f for f, v in (("--steps", args.steps), ("--guidance", args.guidance))
                if v is not None]  # fmt: skip
    if sampling and bundle.kind not in ("latent-delta", "masked-diffusion"):
        raise DataValidationError(args.bundle, "/".join(sampling), f"a {bundle.kind} bundle "
                                  "has no iterative sampler", "drop them (they are for "
                                  "latent-delta and masked-diffusion bundles)")  # fmt: skip
    if bundle.kind == "cvae":  # the conditional VAE (seed 003): its own predictor and modes
        from .cvae_predict import cvae_predictor

        predictor, settings = cvae_predictor(bundle, args)
    elif bundle.kind == "latent-delta":  # perturbation latent diffusion (seeds 000/001)
        from .latent_delta_predict import latent_delta_predictor

        predictor, settings = latent_delta_predictor(bundle, args)
    elif args.mode is not None:
        raise DataValidationError(args.bundle, "--mode", f"a {bundle.kind} bundle has no "
                                  "prediction modes", "drop --mode (it is for cvae and "
                                  "latent-delta bundles)")  # fmt: skip
    elif bundle.kind == "masked-diffusion":  # conditional discrete diffusion (seed 002)
        from .masked_diffusion_predict import masked_diffusion_predictor

        predictor, settings = masked_diffusion_predictor(bundle, args)
    else:
        predictor = OnnxSetPredictor(bundle, args.unseen, args.unseen_cell_type)
        settings = predictor.settings
    controls = read_h5ad(args.controls, "--controls")
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
    summary = {"out": args.out, "n_cells": pred.n_obs, "n_perturbations": len(wanted),
               "seconds": round(time.perf_counter() - start, 2),
               "fallbacks": pred.uns["latentcell"].get("fallbacks", {})}  # fmt: skip
    _finish(args, summary, f"wrote {pred.n_obs:,} predicted cells for {len(wanted)} "
            f"perturbations to {args.out}")  # fmt: skip
    return 0


def run_translate(args) -> int:
    from latentcell.data_pipelines.atomic import write_h5ad_atomic
    from latentcell.data_pipelines.read_h5ad import read_h5ad

    from .translate import OnnxTranslator

    start = time.perf_counter()
    translator = OnnxTranslator(Bundle.load(args.bundle))
    cells = read_h5ad(args.cells, "--cells")
    out = translator.translate_file(cells, args.to, args.cells, args.protein_key)
    write_h5ad_atomic(out, args.out)
    summary = {"out": args.out, "to": args.to, "n_cells": out.n_obs,
               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    _finish(args, summary, f"wrote {out.n_obs:,} cells translated to {args.to} to {args.out}")
    return 0


def run_serve(args) -> int:
    from latentcell.data_pipelines.errors import DataValidationError

    from .service import ServiceLimits, serve

    limits = ServiceLimits(
        max_body_bytes=args.max_body_bytes, read_timeout_s=args.read_timeout,
        concurrency=args.concurrency, queue=args.queue, max_connections=args.max_connections,
    )  # fmt: skip
    if args.workers < 1 or not 0 <= args.port <= 65535:
        raise DataValidationError("serve", "--workers/--port", f"got {args.workers}/{args.port}",
                                  "pass --workers >= 1 and a port from 0 to 65535")  # fmt: skip
    serve(args.bundle, args.host, args.port, args.threads, limits, args.workers)
    return 0


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.func(args), debug)
