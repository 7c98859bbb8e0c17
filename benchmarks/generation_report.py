"""Tables, verdict, figures and MLflow logging of ``latentcell benchmark generation``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from latentcell.benchmarks.generation import METHODS, REPORTED, TARGET_MARGIN


def _value(summary: dict, method: str, key: str) -> float | None:
    m = summary["methods"].get(method, {})
    v = (
        m.get("pooled", {}).get(key)
        if key == "classifier_accuracy"
        else m.get("macro", {}).get(key)
    )
    return None if v is None or not np.isfinite(v) else float(v)


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
    """method -> metric -> mean and sd over every (training seed, sampling seed) pair, plus the
    mean per training seed."""
    table: dict[str, dict] = {}
    train_seeds = sorted({r["train_seed"] for r in runs})
    for method in METHODS:
        rows = {}
        for key in (*REPORTED, "classifier_accuracy"):
            pairs = [(r["train_seed"], _value(r["summary"], method, key)) for r in runs]
            values = [v for _, v in pairs if v is not None]
            if values:
                rows[key] = _stats(values)
                rows[key]["per_train_seed"] = {
                    str(s): float(np.mean([v for t, v in pairs if t == s and v is not None]))
                    for s in train_seeds
                    if any(t == s and v is not None for t, v in pairs)
                }
        table[method] = rows
    table["generated"]["latent_nn_ratio"] = _stats([r["memorization"]["generated"] for r in runs])
    table["real_ceiling"]["latent_nn_ratio"] = _stats(
        [r["memorization"]["held_out_real"] for r in runs]
    )
    return table


def verdict(table: dict) -> dict:
    """The DiT against the Gaussian in PCA: kNN AUC at least TARGET_MARGIN lower, energy lower."""
    dit, gauss = table["generated"], table["gaussian_pca"]
    auc_gap = gauss["knn_auc"]["mean"] - dit["knn_auc"]["mean"]
    energy_gap = gauss["energy_distance"]["mean"] - dit["energy_distance"]["mean"]
    return {
        "knn_auc_dit": dit["knn_auc"]["mean"],
        "knn_auc_gaussian": gauss["knn_auc"]["mean"],
        "knn_auc_margin": auc_gap,
        "knn_auc_met": auc_gap >= TARGET_MARGIN,
        "energy_dit": dit["energy_distance"]["mean"],
        "energy_gaussian": gauss["energy_distance"]["mean"],
        "energy_met": energy_gap > 0,
        "beats_gaussian": auc_gap >= TARGET_MARGIN and energy_gap > 0,
    }


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    if entry["n"] == 1 or entry["sd"] < 1e-9:  # one run, or a deterministic baseline
        return f"{entry['mean']:.3g}"
    return f"{entry['mean']:.3g} ± {entry['sd']:.2g}"


def markdown(results: dict) -> str:
    table, v = results["table"], results["verdict"]
    head = "| metric | " + " | ".join(METHODS) + " |"
    lines = [
        f"# Generation benchmark: {results['data']}",
        "",
        f"Conditions `{','.join(results['condition_columns'])}`: {len(results['conditions'])} "
        f"groups evaluated, skipped: {results['skipped'] or 'none'}. {results['n_train']} "
        f"training / {results['n_heldout']} held-out cells. Training seeds "
        f"{results['train_seeds']}, sampling seeds {results['sampling_seeds']}: "
        "mean ± sd over every pair.",
        "",
        head,
        "|" + "---|" * (len(METHODS) + 1),
    ]
    for key in (*REPORTED, "classifier_accuracy", "latent_nn_ratio"):
        cells = [_cell(table[m].get(key)) for m in METHODS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"DiT vs Gaussian in PCA: kNN AUC {v['knn_auc_dit']:.3f} vs {v['knn_auc_gaussian']:.3f} "
        f"(margin {v['knn_auc_margin']:+.3f}, target ≥ {TARGET_MARGIN}: "
        f"{'met' if v['knn_auc_met'] else 'NOT met'}); energy {v['energy_dit']:.3f} vs "
        f"{v['energy_gaussian']:.3f} ({'met' if v['energy_met'] else 'NOT met'}).",
        "",
        "real_ceiling's latent_nn_ratio is that of held-out real cells (about 1: no copying).",
    ]
    return "\n".join(lines) + "\n"


def figure(table: dict, path: Path) -> Path:
    """kNN AUC and energy distance per method, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in zip(
        axes, ("knn_auc", "energy_distance"), ("kNN AUC (0.5 best)", "energy distance"), strict=True
    ):
        names = [m for m in METHODS if key in table[m]]
        ax.bar(names, [table[m][key]["mean"] for m in names],
               yerr=[table[m][key]["sd"] for m in names], color="#4c72b0", capsize=3)  # fmt: skip
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    if "knn_auc" in table["real_ceiling"]:
        axes[0].set_ylim(0.4, 1.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(args, out: Path, split, runs: list[dict], timings: dict) -> dict:
    from latentcell.trainer.tracking import TrackingConfig, make_tracker

    first = runs[0]["summary"]
    table = aggregate(runs)
    results = {
        "data": split.cells.source,
        "condition_columns": split.cells.columns,
        "classifier_col": split.cells.classifier_col,
        "train_seeds": sorted({r["train_seed"] for r in runs}),
        "sampling_seeds": sorted({r["sampling_seed"] for r in runs}),
        "n_train": int(split.train.n_obs),
        "n_heldout": int(split.held.n_obs),
        "conditions": first["conditions"],
        "skipped": first["skipped_conditions"],
        "settings": {"vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
                     "overrides": args.overrides, "guidance": args.guidance,
                     "steps": args.steps, "heldout_fraction": args.heldout_fraction},
        "protocol": first["protocol"],
        "table": table,
        "verdict": verdict(table),
        "runs": [{k: v for k, v in r.items() if k != "summary"} | {
            "macro": {m: r["summary"]["methods"][m].get("macro", {}) for m in METHODS
                      if m in r["summary"]["methods"]}} for r in runs],
        "timings": timings,
    }  # fmt: skip
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(results))
    fig = figure(table, out / "figures" / "knn_auc_energy.png")

    tracker = make_tracker(TrackingConfig(), f"sqlite:///{out / 'mlflow.db'}", True)
    tracker.start(run_name=f"benchmark-generation-{out.name}", params={
        "data": split.cells.source, "condition_col": ",".join(split.cells.columns),
        **{k: str(v) for k, v in results["settings"].items()},
    }, tags={"latentcell.benchmark": "generation"})  # fmt: skip
    tracker.log_metrics(
        {f"{m}/{k}": v["mean"] for m, rows in table.items() for k, v in rows.items()}, step=0
    )
    for path in (out / "results.json", out / "results.md", fig):
        tracker.log_artifact(path, "benchmark")
    for name in ("pca_real_vs_generated.png", "metrics_vs_baselines.png"):
        if (Path(runs[0]["eval_dir"]) / name).exists():
            tracker.log_artifact(Path(runs[0]["eval_dir"]) / name, "benchmark/first_seed")
    tracker.end("FINISHED")
    print(markdown(results))
    print(f"results in {out / 'results.md'} ({timings['total_s']:.0f} s)")
    return results
