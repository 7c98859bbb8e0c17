"""``latentcell demo``: the project's main job end to end on a built-in synthetic dataset.

Synthesize a VCC-schema h5ad -> build a Zarr v3 store (HVGs + perturbed targets) -> stream
one epoch through ``CellStream`` and ST-style sets through ``SetSampler`` -> train a count
VAE through the shared trainer, tracked in MLflow (SQLite under ``--out``) -> print where
everything is. Later stages (generation, export) extend the same command. Everything stays
under ``--out`` (default ``runs/demo``); re-running reuses the data and retrains the VAE.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the end-to-end demo on synthetic data")
    parser.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=20)
    parser.add_argument("--cell-types", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--hvg", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vae-steps", type=int, default=400, help="VAE training steps (0 skips training)"
    )
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


class _Step:
    """Prints each finished step with its duration."""

    def __init__(self):
        self.start = time.perf_counter()

    def done(self, message: str) -> float:
        seconds = time.perf_counter() - self.start
        print(f"[{seconds:6.1f}s] {message}")
        self.start = time.perf_counter()
        return seconds
