"""The trajectory benchmark's report: per held-out bin, the DiT beside its neighbour-bin
baseline and the real-vs-real ceiling, mean ± sd over (training seed, sampling seed) pairs,
in ``results.json`` (with every run's per-bin numbers) and ``results.md``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from latentcell.benchmarks.trajectory_steps import BASELINE

METHODS = ("generated", BASELINE, "real_ceiling")
REPORTED = (
    "knn_auc", "energy_distance", "mmd", "precision", "recall",
    "mean_pearson", "mean_r2", "var_pearson", "var_r2", "zero_frac_mae",
)  # fmt: skip
LOWER_IS_BETTER = {"energy_distance", "mmd", "zero_frac_mae"}  # kNN AUC: nearest 0.5 best
BASELINE_NAME = {"interior": "interpolation (both neighbours' cells, half each)",
                 "last": "persistence (the last training bin's cells)"}  # fmt: skip


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return None
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}


def per_bin_table(runs: list[dict], held_out: dict[str, str]) -> dict:
    """bin -> method -> metric -> mean/sd over runs (the evaluator's per-condition numbers)."""
    table = {}
    for label in held_out:
        table[label] = {}
        for method in METHODS:
            rows = {}
            for key in REPORTED:
                values = []
                for r in runs:
                    entry = r["summary"]["methods"].get(method, {})
                    values.append(entry.get("per_condition", {}).get(label, {}).get(key))
                stats = _stats(values)
                if stats:
                    rows[key] = stats
            table[label][method] = rows
    return table


def _better(key: str, a: float, b: float) -> bool:
    if key == "knn_auc":
        return abs(a - 0.5) < abs(b - 0.5)
    return a < b if key in LOWER_IS_BETTER else a > b


def verdicts(table: dict, held_out: dict[str, str]) -> dict:
    """Per bin: the metrics on which the DiT beats its baseline, and those where it loses."""
    out = {}
    for label, role in held_out.items():
        dit, base = table[label]["generated"], table[label][BASELINE]
        keys = [k for k in REPORTED if k in dit and k in base]
        wins = [k for k in keys if _better(k, dit[k]["mean"], base[k]["mean"])]
        out[label] = {"role": role, "dit_better": wins,
                      "baseline_better": [k for k in keys if k not in wins]}  # fmt: skip
    return out


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "—"
    if stats["n"] == 1 or stats["sd"] < 1e-9:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def markdown(results: dict) -> str:
    s, t = results["settings"], results["timings"]
    lines = [
        f"# Trajectory generation at held-out times: {results['data']}", "",
        f"`obs['{s['time_col']}']` cut into {s['bins']} equal-count bins; held out: "
        + ", ".join(f"{b} ({r}, time {results['bin_ranges'][b][0]:.3g}–"
                    f"{results['bin_ranges'][b][1]:.3g})" for b, r in results["held_out"].items())
        + f". {results['n_train']} training / {results['n_heldout']} held-out cells. VAE "
        f"{s['vae_steps']} steps, DiT {s['dit_steps']} steps (conditioned on time alone), "
        f"training seeds {results['train_seeds']}, sampling seeds {results['sampling_seeds']}: "
        "mean ± sd over every pair. One DiT cell per held-out cell, at that cell's time. Each "
        "method is scored against the same third of the bin's real cells; the ceiling is "
        "another third (real vs real); the last third fits the PCA.", "",
    ]  # fmt: skip
    for label, role in results["held_out"].items():
        v = results["verdict"][label]
        lines += [
            f"## {label}: {role} bin; baseline = {BASELINE_NAME[role]}", "",
            "| metric | DiT | baseline | real ceiling |", "|---|---|---|---|",
        ]  # fmt: skip
        for key in REPORTED:
            row = [_cell(results["table"][label][m].get(key)) for m in METHODS]
            lines.append(f"| {key} | " + " | ".join(row) + " |")
        lines += [
            "",
            f"DiT better than the baseline on: {', '.join(v['dit_better']) or 'nothing'}; "
            f"baseline better on: {', '.join(v['baseline_better']) or 'nothing'}.",
            "",
        ]
    lines += [
        "kNN AUC: 0.5 is indistinguishable from the real cells; energy distance, MMD and "
        "zero_frac_mae: lower is better; the rest: higher is better. Gene-level numbers are "
        "per-gene means / variances of log1p-normalised HVG expression against the real third.",
        "",
        f"Run time: {t['total_s']:.0f} s on {results['threads']} CPU thread(s).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_report(args, out: Path, bins, split, runs: list[dict], timings: dict) -> dict:
    """results.json and results.md (temporary sibling, then rename) and the table printed."""
    import torch

    from latentcell.data_pipelines.atomic import write_json_atomic
    from latentcell.evaluation.generation import to_jsonable

    table = per_bin_table(runs, bins.held_out)
    first = runs[0]["summary"]
    results = {
        "data": str(args.data),
        "time_col": bins.time_col,
        "held_out": bins.held_out,
        "bin_ranges": {f"bin{k:02d}": e for k, e in enumerate(bins.edges)},
        "n_train": int(split.train.n_obs),
        "n_heldout": int(split.held.n_obs),
        "train_seeds": sorted({r["train_seed"] for r in runs}),
        "sampling_seeds": sorted({r["sampling_seed"] for r in runs}),
        "settings": {"time_col": bins.time_col, "bins": bins.n_bins, "vae_steps": args.vae_steps,
                     "dit_steps": args.dit_steps, "overrides": args.overrides,
                     "guidance": args.guidance, "steps": args.steps},
        "protocol": first["protocol"],
        "skipped": first["skipped_conditions"],
        "table": table,
        "verdict": verdicts(table, bins.held_out),
        "runs": [{"train_seed": r["train_seed"], "sampling_seed": r["sampling_seed"],
                  "per_bin": {m: r["summary"]["methods"][m].get("per_condition", {})
                              for m in METHODS if m in r["summary"]["methods"]}}
                 for r in runs],
        "threads": torch.get_num_threads(),
        "timings": timings,
    }  # fmt: skip
    results = to_jsonable(results)
    write_json_atomic(out / "results.json", results)
    tmp = out / f".results.md.tmp-{os.getpid()}"
    try:
        tmp.write_text(markdown(results))
        os.replace(tmp, out / "results.md")
    finally:
        tmp.unlink(missing_ok=True)
    print(markdown(results))
    print(f"results in {out / 'results.md'} ({timings['total_s']:.0f} s)")
    return results
