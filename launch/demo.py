"""``latentcell demo``: the project's main job end to end on a built-in synthetic dataset.

Synthesize a VCC-schema h5ad -> build a Zarr v3 store (HVGs + perturbed targets) -> stream
one epoch through ``CellStream`` and ST-style sets through ``SetSampler`` -> train a count
VAE through the shared trainer, tracked in MLflow (SQLite under ``--out``) -> train a small
latent DiT on the VAE's latents -> generate cells of every cell type and judge them against
real cells with the generation metric suite -> export the DiT run to ONNX and sample from the
bundle with onnxruntime (no torch) -> a small perturbation leaderboard (``latentcell benchmark
perturbation``, held-out cells, one seed): ST, the conditional VAE (modes b and a), latent shift
and every baseline trained on the same split and judged by cell-eval, its table printed last.
Everything stays under ``--out`` (default ``runs/demo``), in one MLflow store; re-running reuses
the data and retrains the models.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    from latentcell.data_pipelines.lazy_commands import DefaultsHelpFormatter

    parser = sub.add_parser("demo", help="run the end-to-end demo on synthetic data",
                            formatter_class=DefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="runs/demo", help="working directory")
    parser.add_argument("--cells", type=int, default=20_000, help="synthetic cells")
    parser.add_argument("--genes", type=int, default=2000, help="synthetic genes")
    parser.add_argument("--perturbations", type=int, default=20, help="perturbed genes")
    parser.add_argument("--cell-types", type=int, default=2, help="cell types")
    parser.add_argument("--batches", type=int, default=3, help="batches")
    parser.add_argument("--hvg", type=int, default=1000, help="highly variable genes kept")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--vae-steps", type=int, default=400, help="VAE training steps (0 skips training)"
    )
    parser.add_argument(
        "--dit-steps", type=int, default=600, help="DiT training steps (0 skips the DiT)"
    )
    parser.add_argument("--st-steps", type=int, default=300,
                        help="ST steps in the perturbation leaderboard (0 skips the leaderboard)")  # fmt: skip
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
    from latentcell.data_pipelines.inspect_store import summarize_store
    from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
    from latentcell.data_pipelines.stores import open_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h5ad, store = out / "synthetic_vcc.h5ad", out / "store.zarr"

    step = _Step()
    reused = h5ad.exists()
    if not reused:
        config = SynthConfig(
            schema="vcc",
            n_cells=args.cells,
            n_genes=args.genes,
            n_perturbations=args.perturbations,
            n_cell_types=args.cell_types,
            n_batches=args.batches,
            seed=args.seed,
        )
        synthesize(config, h5ad)
    step.done(f"{'reused' if reused else 'synthesized'} {h5ad}")

    reused = store.exists()
    if not reused:
        build_store([h5ad], store, format="zarr", schema="vcc", hvg=args.hvg, combine_targets=True)
    step.done(f"{'reused' if reused else 'built'} {store}")
    summary = summarize_store(str(store))
    print(json.dumps({k: summary[k] for k in ("n_cells", "n_genes", "n_groups", "roles")}))

    stream = CellStream(
        partial(open_store, store), CellStreamConfig(batch_size=256, seed=args.seed)
    )
    n_cells = n_batches = 0
    seen_types: set[int] = set()
    for batch in stream.loader():
        real = ~batch["is_pad"]
        n_cells += int(real.sum())
        n_batches += 1
        seen_types.update(batch["obs"]["cell_type"][real].tolist())
    seconds = step.done(f"streamed one epoch: {n_batches} batches, {n_cells} cells")
    print(f"  cell stream: {n_cells / seconds:,.0f} cells/s; cell types seen: {len(seen_types)}")

    sets = SetSampler(partial(open_store, store), SetSamplerConfig(set_size=64, seed=args.seed))
    levels: dict[str, int] = {}
    n_sets = 0
    for pair in sets.loader():
        levels[pair["match_level"]] = levels.get(pair["match_level"], 0) + 1
        n_sets += 1
    seconds = step.done(f"sampled {n_sets} (control set, perturbed set) pairs of 64 cells")
    print(f"  set sampler: {n_sets / seconds:,.0f} sets/s; control matched by {levels}")
    if args.vae_steps > 0:
        _train_vae(out, store, args.vae_steps, args.seed)
        step.done("trained the count VAE")
        if args.dit_steps > 0:
            _train_dit(out, store, args.dit_steps, args.seed)
            step.done("trained the latent DiT")
            _generate_and_evaluate(out, h5ad, args.seed)
            step.done("generated cells and evaluated them")
    if args.vae_steps > 0 and args.dit_steps > 0:
        _export_and_sample(out, args.seed)
        step.done("exported the DiT run to ONNX and sampled from the bundle without torch")
    if args.st_steps > 0:
        _leaderboard(out, store, args.st_steps)
        step.done("perturbation leaderboard: every family and baseline on the held-out cells")
    print(f"demo finished; outputs in {out}")
    return 0


def _train_vae(out: Path, store: Path, steps: int, seed: int) -> None:
    """The same run as ``latentcell train vae --config launch/configs/vae_demo.toml``."""
    import shutil

    from latentcell.trainer.config import load_config
    from latentcell.trainer.loop import fit
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    run_dir = out / "vae"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (not a resume)
    config = load_config(
        VAERunConfig,
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            f"train.eval_every={max(steps // 4, 1)}",
            f"train.checkpoint_every={max(steps // 2, 1)}",
            f"model.kl_warmup_steps={steps // 4}",
            "optim.warmup_steps=20",
            "tracking.log_every=20",
            "tracking.run_name=demo-vae",
        ],
    )
    result = fit(VAEStage(config), config)
    val = result.val_metrics
    print(
        f"  VAE: {result.step} steps at {result.cells_per_s:,.0f} cells/s; held-out ELBO "
        f"{val.get('val/elbo', float('nan')):,.1f} nats/cell "
        f"(reconstruction {val.get('val/reconstruction', float('nan')):,.1f}, "
        f"KL {val.get('val/kl', float('nan')):,.2f})"
    )
    print(f"  weights: {result.final_dir / 'model.safetensors'}; curves: {run_dir}")
    db = result.tracking_uri
    print(f"  MLflow: run {result.mlflow_run_id} in {db}")
    print(f"  review it: mlflow ui --backend-store-uri {db} --port 5000  (then open :5000)")


def _train_dit(out: Path, store: Path, steps: int, seed: int) -> None:
    """The same run as ``latentcell train dit --config launch/configs/dit_demo.toml``."""
    import shutil

    from latentcell.trainer.config import load_config
    from latentcell.trainer.dit_stage import DiTRunConfig, DiTStage
    from latentcell.trainer.loop import fit

    run_dir = out / "dit"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(
        DiTRunConfig,
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            f"vae.run={out / 'vae'}",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            f"train.eval_every={max(steps // 3, 1)}",
            f"train.checkpoint_every={max(steps // 2, 1)}",
            "model.conditions=cell_type",
            "model.patch_size=5",
            "model.hidden=96",
            "model.depth=2",
            "data.batch_size=512",
            "optim.lr=1e-3",
            "optim.warmup_steps=50",
            "train.ema_decay=0.99",
            "tracking.log_every=20",
            "tracking.run_name=demo-dit",
        ],
    )
    result = fit(DiTStage(config), config)
    print(
        f"  DiT: {result.step} steps at {result.cells_per_s:,.0f} cells/s; held-out diffusion "
        f"loss {result.val_metrics.get('val/loss', float('nan')):.3f} "
        f"(EMA {result.val_metrics.get('val_ema/loss', float('nan')):.3f}); MLflow run "
        f"{result.mlflow_run_id}"
    )


def _generate_and_evaluate(out: Path, h5ad: Path, seed: int) -> None:
    """200 cells of every cell type from the DiT and from the VAE prior, judged against
    real cells of the synthetic data (as ``latentcell generate`` + ``evaluate generation``)."""
    import anndata as ad
    import numpy as np

    from latentcell.evaluation.generation import evaluate_generation
    from latentcell.evaluation.protocol import GenerationProtocol
    from latentcell.inference.generate import CellGenerator, write_h5ad_atomic

    generator = CellGenerator.load(out / "dit")
    generated = generator.generate(200, {"cell_type": "*"}, seed=seed)
    prior = generator.generate(200, {"cell_type": "*"}, seed=seed, source="vae_prior")
    write_h5ad_atomic(generated, out / "generated.h5ad")
    print(f"  generated {generated.n_obs} cells -> {out / 'generated.h5ad'}")
    real = ad.read_h5ad(h5ad)
    cells = np.random.default_rng(seed).permutation(real.n_obs)[:3000]
    # The store kept the HVGs and targets: judge on those genes (matched by symbol).
    real = real[cells][:, real.var_names.isin(generated.var["gene_symbol"])].copy()
    protocol = GenerationProtocol(n_hvg=500, n_pcs=30, min_cells=50, seed=seed)
    summary = evaluate_generation(
        generated, real, "cell_type", baselines={"vae_prior": prior}, protocol=protocol,
        out_dir=out / "evaluation",
    )  # fmt: skip
    for method in ("generated", "vae_prior", "gaussian_pca", "real_ceiling"):
        m = summary["methods"][method]
        print(
            f"  {method:<13} kNN AUC {m['macro']['knn_auc']:.3f}  energy "
            f"{m['macro']['energy_distance']:.3f}  classifier accuracy "
            f"{m['pooled']['classifier_accuracy']:.3f}"
        )
    print(f"  summary and figures: {out / 'evaluation'}")


def _leaderboard(out: Path, store: Path, st_steps: int) -> None:
    """``latentcell benchmark perturbation`` on the demo's store with a held-out-cells split,
    at demo sizes (one seed, short runs): its table is the demo's last output."""
    import shutil

    from latentcell.benchmarks.perturbation import add_arguments, run

    board = out / "leaderboard"
    shutil.rmtree(board, ignore_errors=True)  # retrain, as every demo step does
    split = out / "split.toml"
    split.write_text("[split]\nseed = 0\n[split.cells]\nval_fraction = 0.1\ntest_fraction = 0.2\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    demo_sizes = [
        f"st:train.max_steps={st_steps}", "st:model.hidden=96",
        "st:model.cell_type_dropout=0", "st:model.perturbation_dropout=0",
        "st:train.ema_decay=0.99", "st:optim.warmup_steps=30",
        "cvae:train.max_steps=600", "latent-shift:train.max_steps=600", "vae:train.max_steps=400",
    ]  # fmt: skip
    run(parser.parse_args([
        "--data", str(store), "--split", str(split), "--seeds", "1",
        "--cells-per-perturbation", "100", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
        "--out", str(board), *(x for o in demo_sizes for x in ("--set", o)),
    ]))  # fmt: skip


def _export_and_sample(out: Path, seed: int) -> None:
    """``latentcell export`` of the DiT run (logged to its MLflow run and registered as
    ``latentcell-demo-dit``), then ``python -m latentcell.export.runtime generate`` from the
    bundle in a separate interpreter: the onnxruntime path a service would use."""
    import contextlib
    import io
    import subprocess
    import sys

    from latentcell.launch.export import add_export_command

    parser = argparse.ArgumentParser()
    add_export_command(parser.add_subparsers())
    bundle = out / "bundle_dit"
    args = parser.parse_args(["export", "--run", str(out / "dit"), "--out", str(bundle),
                              "--register", "latentcell-demo-dit", "--overwrite"])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # the demo says it in its own lines below
        args.func(args)
    metadata = json.loads((bundle / "metadata.json").read_text())
    parity = {k: f"{v['parity']['max_rel_error']:.1e}" for k, v in metadata["components"].items()}
    print(
        f"  bundle: {bundle} (opset {metadata['versions']['opset']}; ORT vs torch, max "
        f"relative error {parity})"
    )
    generated = out / "generated_onnx.h5ad"
    command = [sys.executable, "-m", "latentcell.export.runtime", "generate", "--bundle",
               str(bundle), "--n", "200", "--condition", "cell_type=*", "--seed", str(seed),
               "--out", str(generated), "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    print(
        f"  onnxruntime generated {report['n_cells']} cells in {report['seconds']} s -> {generated}"
    )
    print(f"  serve it: python -m latentcell.export.runtime serve --bundle {bundle} --port 8000")


class _Step:
    """Prints each finished step with its duration."""

    def __init__(self):
        self.start = time.perf_counter()

    def done(self, message: str) -> float:
        seconds = time.perf_counter() - self.start
        print(f"[{seconds:6.1f}s] {message}")
        self.start = time.perf_counter()
        return seconds
