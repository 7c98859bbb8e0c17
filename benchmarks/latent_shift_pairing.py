"""Which pairing of unpaired control and perturbed cells trains a latent-shift predictor best.

    latentcell benchmark latent-shift-pairing --out DIR [--data H5AD]
        [--seeds 3] [--steps 1500] [--rules random,ot]

A perturbed cell has no control of its own, so ``train latent-shift`` pairs each with a
control of its (cell type, batch) (``trainer/latent_shift_stage.pair_cells``): ``random``
(drawn uniformly: the set sampler's rule) or ``ot`` (an optimal-transport match on the
embedding). Everything else is fixed: same store, split, PCA, descriptors, predictor and
seed per round; rules alternate within each seed. Printed per rule (mean over seeds, on
the validation groups): ``mse_mean`` (embedding MSE of the mean prediction),
``pearson_delta`` (of the decoded mean shift on the genes), ``energy`` (energy distance of
predicted to real cells in the embedding: the spread), and their ratios to ``random``.

Data: a synthetic store with known effects (``data synth``: 2 cell types, 2 batches, 8
perturbations), then ``--data`` (default: the Papalexi 2021 THP-1 screen when present,
built with batch ``bio_rep``). The design check behind the default pairing rule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared/data/papalexi2021_thp1_sceptre_lowmoi.h5ad"
)
SPLIT = "[split]\nseed = 0\n[split.cells]\nval_fraction = 0.2\ntest_fraction = 0.0\n"
METRICS = ("mse_mean", "pearson_delta", "energy")


def synthetic_store(out: Path) -> Path:
    from latentcell.data_pipelines.build import build_store
    from latentcell.data_pipelines.synth import SynthConfig, synthesize

    store = out / "synthetic.zarr"
    if not store.exists():
        synthesize(SynthConfig(n_cells=6000, n_genes=300, n_perturbations=8, n_cell_types=2,
                               n_batches=2, seed=3), out / "synthetic.h5ad")  # fmt: skip
        build_store([out / "synthetic.h5ad"], store, schema="vcc")
    return store


def papalexi_store(out: Path, data: Path) -> Path:
    from latentcell.data_pipelines.build import build_store

    store = out / "papalexi.zarr"
    if not store.exists():
        build_store([data], store, schema="vcc", batch_col="bio_rep", pert_col="target_gene")
    return store


def compare(store: Path, out: Path, rules: list[str], seeds: int, steps: int) -> dict:
    """{rule: {metric: [value per seed]}} plus training seconds."""
    from latentcell.families.registry import family_named
    from latentcell.families.train import train_family
    from latentcell.trainer.config import load_config

    family = family_named("latent-shift")
    split = out / "split.toml"
    out.mkdir(parents=True, exist_ok=True)
    split.write_text(SPLIT)
    results = {rule: {m: [] for m in (*METRICS, "mse_mean_control", "seconds")} for rule in rules}
    for seed in range(seeds):
        for rule in rules if seed % 2 == 0 else rules[::-1]:  # alternate the order
            config = load_config(family.config_class(), None, [
                f"data.path={store}", f"split.file={split}", f"run.dir={out / f'{rule}-{seed}'}",
                f"train.seed={seed}", f"model.pairing={rule}", f"train.max_steps={steps}",
                "train.progress=false", "tracking.enabled=false",
            ])  # fmt: skip
            start = time.perf_counter()
            summary = train_family(family, config)
            results[rule]["seconds"].append(time.perf_counter() - start)
            for metric in (*METRICS, "mse_mean_control"):
                results[rule][metric].append(summary["val"][metric])
    return results


def report(name: str, results: dict) -> None:
    base = {m: np.mean(results["random"][m]) for m in METRICS} if "random" in results else {}
    print(f"\n{name}  (mean ± sd over seeds; ratio to random)")
    print(f"{'rule':8s} " + " ".join(f"{m:>26s}" for m in METRICS) + "  no-effect mse   seconds")
    for rule, values in results.items():
        cells = []
        for m in METRICS:
            mean, sd = np.mean(values[m]), np.std(values[m])
            ratio = f" ({mean / base[m]:.2f}x)" if base else ""
            cells.append(f"{mean:>12.4f} ± {sd:.4f}{ratio}")
        control, seconds = np.mean(values["mse_mean_control"]), np.mean(values["seconds"])
        print(f"{rule:8s} " + " ".join(f"{c:>26s}" for c in cells)
              + f"  {control:>12.4f}  {seconds:>7.1f}")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="h5ad ('' = synthetic only)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rules", default="random,ot")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rules = args.rules.split(",")
    stores = {"synthetic": synthetic_store(out)}
    if args.data and Path(args.data).exists():
        stores["papalexi2021"] = papalexi_store(out, Path(args.data))
    all_results = {}
    for name, store in stores.items():
        all_results[name] = compare(store, out / name, rules, args.seeds, args.steps)
        report(name, all_results[name])
    (out / "results.json").write_text(json.dumps(all_results, indent=1))
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
