"""The spatial benchmark's report: results.json as measured (every fold), and results.md with
the held-out table and the midpoint table, mean ± sd over folds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

LABELS = {
    "dit_cell": "DiT, one generated cell (sampled counts)",
    "dit_mean": "DiT, expected expression of the generated latent",
    "neighbour_latents": "neighbour latents (mean VAE latent of k nearest), decoded",
    "knn_average": "baseline: k-nearest-spot average",
    "real_held_out": "real held-out spots (classifier ceiling)",
    "layer_vote": "no expression: majority layer of the k nearest training spots",
}
REFERENCES = ("real_held_out", "layer_vote")  # layer accuracy only
METRICS = ("pearson_all", "pearson_top", "layer_accuracy")


def _stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(np.mean(v)), "sd": sd, "n": len(v)}


def summarize(args, spots, folds: list[dict], seconds: float) -> dict:
    held = {
        m: {k: _stats([f["scores"][m].get(k) for f in folds]) for k in METRICS}
        for m in LABELS
    }  # fmt: skip
    midpoints = {
        m: _stats([f["midpoints"].get(m) for f in folds]) for m in LABELS if m not in REFERENCES
    }
    from .spatial import TOP_GENES

    return {
        "data": {"path": str(Path(args.data).resolve()), "n_spots": int(spots.adata.n_obs),
                 "n_genes": int(spots.adata.n_vars), "layer_col": spots.layer_col,
                 "layers": sorted(set(spots.layers))},
        "settings": {"folds": args.folds, "seed": args.seed, "k": args.k,
                     "n_genes": args.n_genes, "top_genes": TOP_GENES,
                     "vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
                     "sampler_steps": args.steps, "guidance": args.guidance,
                     "overrides": list(args.overrides), "torch_threads": _threads()},
        "held_out": held,
        "midpoints": midpoints,
        "midpoint_pairs": [f["midpoints"].get("n_pairs", 0) for f in folds],
        "folds": folds,
        "seconds": seconds,
    }  # fmt: skip


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def markdown(report: dict) -> str:
    d, s, folds = report["data"], report["settings"], report["folds"]
    genes = sorted({f["n_genes"] for f in folds})
    held = sorted({f["n_held_out"] for f in folds})
    lines = [
        "# Spatial generation and super-resolution at held-out spots", "",
        f"`{d['path']}`: {d['n_spots']} spots, {d['n_genes']} genes, {len(d['layers'])} "
        f"layers (`{d['layer_col']}`). {s['folds']}-fold cross-validation over spots (seed "
        f"{s['seed']}; {'/'.join(map(str, held))} held-out spots per fold). Per fold, on the "
        f"other spots' {'/'.join(map(str, genes))} most variable genes: a count VAE "
        f"({s['vae_steps']} steps) and a DiT on its latents conditioned on (x, y) only "
        f"({s['dit_steps']} steps{', ' + ', '.join(s['overrides']) if s['overrides'] else ''};"
        f" sampler steps {s['sampler_steps'] or 'run default'}, guidance "
        f"{s['guidance'] if s['guidance'] is not None else 'run default'}); k = {s['k']} "
        f"nearest training spots; {s['torch_threads']} torch thread(s), {report['seconds']:.0f} s "
        "in all.", "",
        "Pearson r per gene across held-out spots, predicted against measured log1p(count / "
        "library * 1e4) (library over the modelled genes), averaged over the modelled genes "
        f"(\"all\") and over the {s['top_genes']} with the highest training mean (\"top\"). "
        "Layer accuracy: logistic regression on PCA-30 of the real training spots, applied "
        "to each method's held-out predictions. Mean ± sd over folds.", "",
        "| method | per-gene r (all) | per-gene r (top) | layer accuracy |", "|---|---|---|---|",
    ]  # fmt: skip
    for m, label in LABELS.items():
        row = report["held_out"][m]
        lines.append(f"| {label} | {' | '.join(_cell(row[k]) for k in METRICS)} |")
    pairs = report["midpoint_pairs"]
    lines += [
        "", "## Super-resolution at midpoints (no measurement there)", "",
        "Midpoints of neighbouring training spots (closer than 1.5 x the median nearest-spot "
        f"distance) whose two spots share a layer ({min(pairs)}–{max(pairs)} pairs per fold). "
        "Score: the share of midpoints the layer classifier puts in that layer.", "",
        "| method | agreement with both neighbours' layer |", "|---|---|",
    ]  # fmt: skip
    for m, stats in report["midpoints"].items():
        lines.append(f"| {LABELS[m]} | {_cell(stats)} |")
    lines += ["", "Per fold (held-out per-gene r, all genes / layer accuracy):", ""]
    for f in folds:
        parts = [
            f"{m} {f['scores'][m]['pearson_all']:.3f}/{f['scores'][m]['layer_accuracy']:.2f}"
            for m in LABELS if m not in REFERENCES
        ]  # fmt: skip
        real = f["scores"]["real_held_out"]["layer_accuracy"]
        vote = f["scores"]["layer_vote"]["layer_accuracy"]
        lines.append(f"- fold {f['fold']} ({f['seconds']:.0f} s): {'; '.join(parts)}; "
                     f"real {real:.2f}; layer vote {vote:.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> str:
    """results.json and results.md, each written to a temporary name and renamed."""
    text = markdown(report)
    for name, body in (("results.json", json.dumps(report, indent=1)), ("results.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        os.replace(tmp, out / name)
    return text
