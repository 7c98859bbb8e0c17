"""Spatial generation and super-resolution: a VAE + DiT conditioned on spot coordinates,
at held-out spots, beside the k-nearest-spot average.

    latentcell benchmark spatial --data SPOTS.h5ad --out DIR [--layer-col layer] [--folds 5]
        [--seed 0] [--k 6] [--n-genes 2000] [--vae-steps N] [--dit-steps N] [--steps N]
        [--guidance G] [--set model.KEY=V] [--reuse]

1. The spots (raw counts, ``obsm['spatial']``, a layer column) are dealt into ``--folds``
   folds by one seeded permutation; each fold holds out its spots once (5 folds: 20% each).
2. Per fold, on the other folds' spots: a store of their ``--n-genes`` most variable genes,
   a count VAE and a DiT on its latents conditioned on the two coordinates only
   (``model.continuous=spatial_x,spatial_y``, no categorical condition), through the trainer.
3. At every held-out spot's coordinates: one generated cell (``dit_cell``), the decoder's
   expected expression of the same generated latent (``dit_mean``), super-resolution from
   neighbouring latents (``neighbour_latents``: the mean VAE latent of the k nearest training
   spots, decoded) and the baseline ``knn_average`` (mean log1p expression of the k nearest
   training spots). The held-out spots stand in for "coordinates between measured spots":
   they are between training spots and, unlike true midpoints, have a measurement.
4. Scores: per-gene Pearson across held-out spots of predicted against measured
   log1p(count / library * 1e4) (library over the modelled genes), averaged over the modelled
   genes and over the ``TOP_GENES`` with the highest mean in the training spots; and the
   accuracy of a layer classifier trained on the real training spots, beside its accuracy on
   the real held-out spots (the ceiling).
5. True super-resolution: the same methods at midpoints of neighbouring training spots (pairs
   closer than ``NEIGHBOUR_FACTOR`` x the median nearest-spot distance); no measurement
   exists there, so the score is the classifier's agreement with the layer both neighbours
   share (pairs whose neighbours differ are left out).

Every number is a mean ± sd over folds. Writes ``results.json`` and ``results.md`` into
``--out``, and each fold's generated cells (``folds/fold<k>/generated.h5ad``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

COMMAND = "latentcell benchmark spatial"
METHODS = ("dit_cell", "dit_mean", "neighbour_latents", "knn_average")
TOP_GENES = 200
NEIGHBOUR_FACTOR = 1.5
MAX_MIDPOINTS = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="h5ad: raw counts in X, spot "
                        "coordinates in obsm['spatial'], a layer label per spot")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for folds, runs, results.json/.md")
    parser.add_argument("--layer-col", default="layer", help="obs column the classifier predicts")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (>= 2)")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment, training, sampling")
    parser.add_argument("--k", type=int, default=6, help="nearest training spots (baseline and "
                        "neighbour latents)")  # fmt: skip
    parser.add_argument("--n-genes", type=int, default=2000, help="modelled genes per fold")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--dit-steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the DiT run's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the DiT run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a DiT config key, e.g. "
                        "model.depth=2 (repeatable)")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep finished fold runs in --out")


def _check_flags(args) -> None:
    bad = args.folds < 2 or args.k < 1 or args.seed < 0 or args.n_genes < 2
    bad = bad or args.vae_steps < 1 or args.dit_steps < 1
    if bad:
        raise DataValidationError(
            COMMAND, "--folds/--k/--seed/--n-genes/--vae-steps/--dit-steps",
            f"got {args.folds}/{args.k}/{args.seed}/{args.n_genes}/{args.vae_steps}/"
            f"{args.dit_steps}", "pass --folds >= 2, --k >= 1, --seed >= 0, --n-genes >= 2, "
            "steps >= 1",
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """The CLI turns any failure into one line (``data_pipelines.errors.run_cli``)."""
    from .spatial_data import fold_rows, load_spots
    from .spatial_report import summarize, write

    t0 = time.perf_counter()
    _check_flags(args)
    spots = load_spots(args.data, args.layer_col, args.folds)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(f"spatial: {spots.adata.n_obs} spots x {spots.adata.n_vars} genes; {args.folds} "
          f"folds; VAE {args.vae_steps} + DiT {args.dit_steps} steps each", flush=True)  # fmt: skip
    folds = []
    for k, held in enumerate(fold_rows(spots.adata.n_obs, args.folds, args.seed)):
        t = time.perf_counter()
        folds.append(_fold(k, spots, held, out / "folds" / f"fold{k}", args))
        folds[-1]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"fold {k}: {folds[-1]['seconds']:.0f} s", flush=True)
    report = summarize(args, spots, folds, round(time.perf_counter() - t0, 1))
    print(write(out, report))
    print(f"results in {out / 'results.md'} ({report['seconds']:.0f} s)")
    return 0


def _fold(k: int, spots, held_rows: np.ndarray, folder: Path, args) -> dict:
    """Train on the other folds, then score every method at the held-out spots and at
    midpoints of neighbouring training spots."""
    from latentcell.data_pipelines.atomic import write_h5ad_atomic

    from .spatial_data import build_fold_store
    from .spatial_models import log1p_norm, predict, train_fold
    from .spatial_scores import LayerClassifier, mean_r

    mask = np.zeros(spots.adata.n_obs, dtype=bool)
    mask[held_rows] = True
    train, held = spots.adata[~mask].copy(), spots.adata[mask].copy()
    store = build_fold_store(train, folder, args.n_genes)
    models = train_fold(train, store, folder, args, args.seed + k)
    genes = models.genes
    train_x, held_x = log1p_norm(train[:, genes].X), log1p_norm(held[:, genes].X)
    top = np.argsort(-train_x.mean(axis=0), kind="stable")[:TOP_GENES]
    train_layers, held_layers = spots.layers[~mask], spots.layers[mask]
    classifier = LayerClassifier(train_x, train_layers, args.seed)
    preds, cells = predict(models, train, spots.xy[mask], args, args.seed + k)
    write_h5ad_atomic(cells, folder / "generated.h5ad")
    scores = {
        m: {"pearson_all": mean_r(p, held_x), "pearson_top": mean_r(p, held_x, top),
            "layer_accuracy": classifier.accuracy(p, held_layers)}
        for m, p in preds.items()
    }  # fmt: skip
    scores["real_held_out"] = {"layer_accuracy": classifier.accuracy(held_x, held_layers)}
    scores["layer_vote"] = {
        "layer_accuracy": _layer_vote(train, spots.xy[mask], held_layers, args.k)
    }
    return {
        "fold": k, "n_train": int(train.n_obs), "n_held_out": int(held.n_obs),
        "n_genes": len(genes), "scores": scores,
        "midpoints": _midpoints(models, train, classifier, args, args.seed + k),
    }  # fmt: skip


def _layer_vote(train, query_xy: np.ndarray, layers: np.ndarray, k: int) -> float:
    """Accuracy of the majority layer of the k nearest training spots: how much of the layer
    the coordinates alone give, with no expression at all."""
    from .spatial_data import COORDS
    from .spatial_models import nearest

    near = nearest(train.obs[list(COORDS)].to_numpy(np.float64), query_xy, k)
    train_layers = train.obs["layer"].astype(str).to_numpy()[near]
    votes = [max(set(row), key=list(row).count) for row in train_layers]
    return float(np.mean(np.asarray(votes) == layers))


def _midpoints(models, train, classifier, args, seed: int) -> dict:
    """Each method at midpoints of neighbouring training spots; per method the share whose
    predicted layer is the one both neighbours have."""
    from .spatial_data import COORDS
    from .spatial_models import predict

    xy = train.obs[list(COORDS)].to_numpy(np.float64)
    layers = train.obs["layer"].astype(str).to_numpy()
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    step = np.median(np.sort(d, axis=1)[:, 1])
    i, j = np.nonzero(np.triu(d <= NEIGHBOUR_FACTOR * step, k=1))
    same = layers[i] == layers[j]
    i, j = i[same], j[same]
    if len(i) > MAX_MIDPOINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), MAX_MIDPOINTS, replace=False))
        i, j = i[keep], j[keep]
    if len(i) == 0:
        return {"n_pairs": 0}
    mid = (xy[i] + xy[j]) / 2
    preds, _ = predict(models, train, mid, args, seed + 1)
    out = {"n_pairs": int(len(i)), "spot_step": float(step)}
    for m, p in preds.items():
        out[m] = float(np.mean(classifier.predict(p) == layers[i]))
    return out
