"""The leaderboard's table: every entry's metrics per seed -> mean ± sd, beside cell-eval's
training-mean baseline and its real-vs-real ceiling; written as leaderboard.json/.md, a
figure, and one MLflow parent run with a child run per entry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# (column, where in an evaluation summary, higher is better)
COLUMNS = (
    ("vcc_score", "VCC score", True),
    ("des_score", "DES score", True),
    ("pds_score", "PDS score", True),
    ("mae_score", "MAE score", True),
    ("des", "DES (overlap_at_N)", True),
    ("pds", "PDS (discrimination_l1)", True),
    ("mae", "MAE", False),
    ("pearson_delta", "pearson_delta", True),
    ("energy", "energy distance", False),
    ("mean_shift_pearson", "mean-shift r (003)", True),
    ("jaccard_top50", "top-50 Jaccard (003)", True),
    ("embedding_r2", "embedding R² (004)", True),
    ("knn_purity_k20", "kNN purity k=20 (004)", True),
)
RAW = {"des": "overlap_at_N", "pds": "discrimination_score_l1", "mae": "mae",
       "pearson_delta": "pearson_delta"}  # fmt: skip
SCORED = {"des_score": "overlap_at_N", "pds_score": "discrimination_score_l1", "mae_score": "mae"}
CELL_MEAN, CEILING = "cell-mean (cell-eval)", "real vs real (ceiling)"


def _num(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _scoreboard(summary: dict, who: str) -> dict:
    """The seeds' scoreboard means (``evaluate_perturbation``'s "scoreboards"), flattened."""
    board = summary.get("scoreboards", {}).get(who, {})
    board = board.get("mean", board) if isinstance(board, dict) else {}
    return {k: _num(v) for k, v in board.items() if _num(v) is not None}


def entry_metrics(summary: dict, who: str = "model") -> dict:
    """One evaluation's row: cell-eval raw metrics, the VCC scores (against the training
    mean, clipped at 0), energy distance and the scoreboards, for "model" or "baseline"."""
    head = summary["headline"]
    row = {k: _num(head.get(metric, {}).get(who)) for k, metric in RAW.items()}
    if who == "model":
        row |= {k: _num(summary["scores"].get(metric)) for k, metric in SCORED.items()}
        row["vcc_score"] = _num(head["vcc_avg_score"]["model"])
    else:  # the baseline scored against itself: 0 by construction
        row |= {k: 0.0 for k in (*SCORED, "vcc_score")}
    row["energy"] = _num(summary["energy_distance"].get(who))
    return row | _scoreboard(summary, who)


def ceiling_metrics(summary: dict) -> dict:
    head = summary["headline"]
    return {k: _num(head.get(metric, {}).get("ceiling")) for k, metric in RAW.items()}


def aggregate(per_seed: list[dict]) -> dict:
    """mean, sd (ddof 1; 0 with one seed) and n over seeds of every metric."""
    keys = sorted({k for row in per_seed for k in row})
    out = {}
    for key in keys:
        values = [row[key] for row in per_seed if row.get(key) is not None]
        if values:
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[key] = {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}
    return out


def _cell(stats: dict | None) -> str:
    if not stats:
        return "—"
    if stats["n"] > 1:
        return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    return f"{stats['mean']:.3f}"


def markdown(board: dict) -> str:
    shown = [c for c in COLUMNS if any(c[0] in row.get("table", {}) for row in board["rows"])]
    lines = [
        f"# Perturbation leaderboard: {board['task']['description']}", "",
        f"store `{board['task']['store']}`, split `{board['task']['split']}`; "
        f"{len(board['task']['perturbations'])} test perturbations, "
        f"{board['task']['n_real']} real test cells, {board['task']['n_controls']} controls; "
        f"seeds {board['seeds']}; {board['cells_per_perturbation']} predicted cells per "
        "perturbation. mean ± sd over seeds. Scores: cell-eval's, against the training cell "
        "mean (0 = no better), clipped at 0, as the Virtual Cell Challenge scored; VCC score = "
        "their mean.", "",
        "| entry | " + " | ".join(f"{label} {'↑' if up else '↓'}" for _, label, up in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]  # fmt: skip
    for row in board["rows"]:
        if "refused" in row:
            lines.append(
                f"| {row['entry']} | refused: {row['refused']} |" + " |" * (len(shown) - 1)
            )
            continue
        cells = [_cell(row["table"].get(key)) for key, _, _ in shown]
        lines.append(f"| {row['entry']} | " + " | ".join(cells) + " |")
    lines += ["", board["verdict"], ""]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """Which entry wins on the VCC score and on energy distance, and by how much."""
    scored = [r for r in rows if "table" in r and r["entry"] not in (CELL_MEAN, CEILING)]
    parts = []
    for key, label, up in (("vcc_score", "VCC score", True), ("energy", "energy distance", False)):
        have = [r for r in scored if key in r["table"]]
        if len(have) < 2:
            continue
        have.sort(key=lambda r: r["table"][key]["mean"], reverse=up)
        best, second = (r["table"][key] for r in have[:2])
        gap = abs(best["mean"] - second["mean"])
        noise = max(best["sd"], second["sd"])
        within = f", within one sd ({noise:.3f})" if best["n"] > 1 and gap <= noise else ""
        parts.append(f"Best {label}: {have[0]['entry']} ({best['mean']:.3f}), {gap:.4f} "
                     f"{'above' if up else 'below'} {have[1]['entry']}{within}.")  # fmt: skip
    return " ".join(parts)


def figure(board: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in board["rows"] if "table" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8))
    for ax, (key, label) in zip(axes, (("vcc_score", "VCC score ↑"), ("energy", "energy ↓")),
                                strict=True):  # fmt: skip
        names = [r["entry"] for r in rows if key in r["table"]]
        means = [r["table"][key]["mean"] for r in rows if key in r["table"]]
        sds = [r["table"][key]["sd"] for r in rows if key in r["table"]]
        ax.barh(names, means, xerr=sds, color="#4c72b0")
        ax.invert_yaxis()
        ax.set_xlabel(label)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_board(out: Path, board: dict) -> None:
    for name, text in (("leaderboard.json", json.dumps(board, indent=1, default=str)),
                       ("leaderboard.md", markdown(board))):  # fmt: skip
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def log_mlflow(out: Path, board: dict, fig: Path, uri: str) -> str | None:
    """One parent run (the board, its files) and a child run per entry (its metrics: mean,
    sd and every seed), in the store ``uri`` of the entries' training runs."""
    from latentcell.trainer.tracking import TrackingConfig, make_tracker

    parent = make_tracker(TrackingConfig(), uri, True)
    parent_id = parent.start(
        run_name=f"leaderboard-{out.name}",
        params={"store": board["task"]["store"], "split": board["task"]["split"],
                "seeds": str(board["seeds"]), "entries": ",".join(r["entry"] for r in board["rows"])},
        tags={"latentcell.benchmark": "perturbation"},
    )  # fmt: skip
    for row in board["rows"]:
        child = make_tracker(TrackingConfig(), uri, True)
        tags = {"latentcell.entry": row["entry"], "latentcell.benchmark": "perturbation"}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        child.start(run_name=row["entry"], params={"kind": row["kind"]}, tags=tags)
        if "table" in row:
            metrics = {f"{k}/mean": v["mean"] for k, v in row["table"].items()}
            metrics |= {f"{k}/sd": v["sd"] for k, v in row["table"].items()}
            child.log_metrics(metrics, step=0)
            for i, seed_row in enumerate(row.get("per_seed", [])):
                child.log_metrics({k: v for k, v in seed_row.items() if v is not None}, step=i)
        figure_003 = Path(row.get("eval_dir", "")) / "figures" / "scoreboard_003.png"
        if row.get("eval_dir") and figure_003.exists():  # the first seed's seed-003 figure
            child.log_artifact(figure_003, "scoreboard")
        child.end("FINISHED")
    for path in (out / "leaderboard.json", out / "leaderboard.md", fig):
        parent.log_artifact(path, "leaderboard")
    parent.end("FINISHED")
    return parent_id
