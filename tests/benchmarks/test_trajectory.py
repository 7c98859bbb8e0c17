"""``latentcell benchmark trajectory``: the time condition reaches the generated cells (a DiT
trained on cells whose expression follows a known function of time recovers it at a held-out
time), the baselines are what they say, the command writes its results, bad input is one
line and exit 2."""

from __future__ import annotations

import argparse
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from latentcell.launch.cli import main

N_GENES = 40


def _truth(t: np.ndarray) -> np.ndarray:
    """Poisson rates (cells x genes): half the genes rise 20-fold over t in [0, 1], half fall."""
    slope = np.where(np.arange(N_GENES) < N_GENES // 2, 3.0, -3.0)
    return 2.0 * np.exp(slope[None, :] * (np.asarray(t)[:, None] - 0.5))


def _cells(path, n=600, seed=0, time_col="Pseudotime"):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 1.0, n)
    X = rng.poisson(_truth(t)).astype(np.float32)
    obs = pd.DataFrame({time_col: t}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs)
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    adata.write_h5ad(path)
    return path


def _log_means(X) -> np.ndarray:
    X = np.asarray(X.todense() if sp.issparse(X) else X, dtype=np.float64)
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4).mean(0)


def _args(data, out, **kw) -> argparse.Namespace:
    base = dict(data=str(data), out=str(out), time_col="Pseudotime", bins=10, train_seeds="0",
                sampling_seeds="0", vae_steps=6, dit_steps=6, overrides=[], guidance=None,
                steps=3, reuse=False)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
def test_dit_recovers_the_dependence_on_time_at_a_held_out_time(tmp_path):
    """Trained without bin 5 (t ~ 0.5-0.6) and bin 9 (t > 0.9), the DiT's cells at the
    held-out cells' own times have gene means near the truth at those times: closer than the
    truth at either end of time, and closer than the same DiT's cells at times shifted by
    +-0.35 (so the answer comes from the time, not from the average cell); the rising genes
    rise and the falling genes fall along the DiT's time."""
    from latentcell.benchmarks.generation_steps import train_models
    from latentcell.benchmarks.trajectory_steps import (
        BIN_COL,
        dit_overrides,
        generate_at_times,
        load_time_cells,
        split_bins,
    )

    torch.manual_seed(0)
    data = _cells(tmp_path / "cells.h5ad", n=1000)
    args = _args(data, tmp_path, vae_steps=300, dit_steps=600, steps=20,
                 overrides=["vae.train.eval_every=0", "dit.train.eval_every=0",
                            "vae.model.n_latent=4", "dit.model.patch_size=2",
                            "dit.train.ema=false", "dit.optim.lr=0.002"])  # fmt: skip
    bins = load_time_cells(str(data), "Pseudotime", 10)
    split = split_bins(bins, tmp_path)
    args.overrides += dit_overrides("Pseudotime")
    generator = train_models(args, split, tmp_path / "train_seed0", 0).generator
    held = split.held[split.held.obs[BIN_COL] == "bin05"]
    times = held.obs["Pseudotime"].to_numpy(np.float32)
    labels = held.obs[BIN_COL].astype(str).to_numpy()

    def dit(t, seed=0):
        return _log_means(generate_at_times(generator, "Pseudotime", t, labels, seed, args).X)

    rng = np.random.default_rng(1)
    truth = _log_means(rng.poisson(_truth(times)))
    gen = dit(times)
    err = np.abs(gen - truth).mean()
    for far_t in (0.02, 0.98):
        far = _log_means(rng.poisson(_truth(np.full(len(times), far_t))))
        assert err < 0.5 * np.abs(gen - far).mean()
    early, late = dit(times - 0.35, 1), dit(times + 0.35, 1)
    assert err < 0.6 * np.abs(early - truth).mean()
    assert err < 0.6 * np.abs(late - truth).mean()
    rise = late - early
    assert (rise[: N_GENES // 2] > 0).mean() > 0.9 and (rise[N_GENES // 2 :] < 0).mean() > 0.9


def test_bins_and_neighbour_baseline(tmp_path):
    """Equal-count bins in time order; the interior bin's baseline is half of each neighbour,
    the last bin's is the last training bin."""
    from latentcell.benchmarks.trajectory_steps import (
        BIN_COL,
        load_time_cells,
        neighbour_baseline,
        split_bins,
    )

    bins = load_time_cells(str(_cells(tmp_path / "c.h5ad")), "Pseudotime", 10)
    obs = bins.cells.obs
    assert (obs[BIN_COL].value_counts() == 60).all()
    assert bins.held_out == {"bin05": "interior", "bin09": "last"}
    assert all(a[1] <= b[0] for a, b in zip(bins.edges, bins.edges[1:], strict=False))
    split = split_bins(bins, tmp_path)
    assert split.train.n_obs == 480 and set(split.held.obs[BIN_COL]) == {"bin05", "bin09"}
    base = neighbour_baseline(bins, split, 0)
    t = base.obs["Pseudotime"].to_numpy()
    interior = base.obs[BIN_COL].to_numpy() == "bin05"
    lo, hi = bins.edges[4], bins.edges[6]
    assert interior.sum() == 60 and (base.obs[BIN_COL] == "bin09").sum() == 60
    assert ((t[interior] >= lo[0]) & (t[interior] <= lo[1])).sum() == 30
    assert ((t[interior] >= hi[0]) & (t[interior] <= hi[1])).sum() == 30
    last = bins.edges[8]
    assert ((t[~interior] >= last[0]) & (t[~interior] <= last[1])).all()


def test_command_writes_results(tmp_path):
    data = _cells(tmp_path / "cells.h5ad")
    out = tmp_path / "bench"
    argv = ["benchmark", "trajectory", "--data", str(data), "--out", str(out),
            "--vae-steps", "6", "--dit-steps", "6", "--steps", "3", "--sampling-seeds", "0,1",
            "--set", "vae.train.eval_every=0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["held_out"] == {"bin05": "interior", "bin09": "last"}
    assert results["n_train"] == 480 and results["n_heldout"] == 120
    for label in ("bin05", "bin09"):
        for method in ("generated", "neighbour_bins", "real_ceiling"):
            entry = results["table"][label][method]["knn_auc"]
            assert 0.0 <= entry["mean"] <= 1.0
        assert results["table"][label]["generated"]["knn_auc"]["n"] == 2
    text = (out / "results.md").read_text()
    assert "interpolation" in text and "persistence" in text


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        ("no_time", "Pseudotime"),
        ("directory", "--data"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, make, needle):
    if make == "no_time":
        data = _cells(tmp_path / "cells.h5ad", time_col="age")
    else:
        data = tmp_path / "folder"
        data.mkdir()
    argv = ["benchmark", "trajectory", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Fix:" in err
