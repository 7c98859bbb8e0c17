"""The multiomics benchmark's report: results.json as measured, and results.md with the
headline table (mean ± sd over folds), the totalVI status, and every protein's r beside
ridge's, sorted so the proteins where the model loses come first."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

HEADERS = {
    "rna_to_protein": "RNA → protein, per-protein r",
    "protein_to_rna": "protein → RNA, per-gene r (modelled genes)",
    "protein_to_rna_detected": "protein → RNA, per-gene r (detected genes)",
}


def _cell(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    sign = "+" if "wins" in stats else ""
    mean = f"{stats['mean']:{sign}.3f}"
    return f"{mean} ± {stats['sd']:.3f}" if stats["n"] > 1 else mean


def _r(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    s, d, folds = report["settings"], report["data"], report["folds"]
    genes = sorted({f["n_genes"] for f in folds})
    detected = [f["n_detected"] for f in folds]
    lines = [
        "# RNA ↔ protein translation on held-out cells", "",
        f"`{d['path']}` ({d['source'] or 'no uns source'}): {d['n_cells']} cells, "
        f"{d['n_genes']} genes, {d['n_proteins']} proteins. {s['folds']}-fold cross-validation "
        f"over cells (seed {s['seed']}); each fold's model trained {s['steps']} steps on the "
        f"other folds' cells{' with ' + ', '.join(s['overrides']) if s['overrides'] else ''}. "
        "Pearson r across held-out cells of predicted against measured "
        "log1p(count / library * 1e4), averaged over proteins or genes, then mean ± sd over "
        f"folds. Modelled genes: the {'/'.join(map(str, genes))} most variable of each fold's "
        "training cells (Seurat v3); detected genes: those of them in at least "
        f"{s['detected']:.0%} of the held-out cells ({min(detected)}–{max(detected)} per fold). "
        "The RNA library is the sum over the modelled genes. Ridge: "
        f"{s['ridge']}, fitted on the same training cells and genes.", "",
        f"| entry | {' | '.join(HEADERS.values())} |", "|---|---|---|---|",
    ]  # fmt: skip
    for name, row in report["table"].items():
        cells = [_cell(row.get(k)) for k in HEADERS]
        if all("wins" in row.get(k, {}) for k in HEADERS):  # the paired difference
            cells = [
                f"{c} (wins {row[k]['wins']}/{row[k]['n']})"
                for c, k in zip(cells, HEADERS, strict=True)
            ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(f"| totalVI | {report['totalvi']['status']} | | |")
    lines += ["", f"totalVI: {report['totalvi']['note']}.", ""]
    per_protein = report["per_protein"]
    gaps = [(p["multiomics"] - p["ridge"]) if None not in (p["multiomics"], p["ridge"])
            else math.inf for p in per_protein]  # fmt: skip
    losses = sum(g < 0 for g in gaps)
    lines += [
        f"Per protein (mean r over folds): the model is below ridge on {losses} of "
        f"{len(per_protein)} proteins (listed first).",
        "",
        "| protein | multiomics r | ridge r | difference |",
        "|---|---|---|---|",
    ]
    for i in np.argsort(gaps, kind="stable"):
        p = per_protein[i]
        gap = "—" if not math.isfinite(gaps[i]) else f"{gaps[i]:+.3f}"
        lines.append(f"| {p['protein']} | {_r(p['multiomics'])} | {_r(p['ridge'])} | {gap} |")
    lines += ["", f"{report['seconds']:.0f} s in all (training "
              f"{sum(f['train_seconds'] for f in folds):.0f} s).", ""]  # fmt: skip
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    """results.json and results.md, each written to a temporary sibling and renamed."""
    from latentcell.data_pipelines.atomic import write_json_atomic

    from .uncertainty import _plain

    write_json_atomic(out / "results.json", _plain(report))
    tmp = out / f".results.md.tmp-{os.getpid()}"
    try:
        tmp.write_text(markdown(report))
        os.replace(tmp, out / "results.md")
    finally:
        tmp.unlink(missing_ok=True)
