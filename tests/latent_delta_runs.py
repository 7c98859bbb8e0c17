"""A tiny latent-delta run (and the count VAE it works in) on the synthetic perturbation store
of ``cvae_runs``, shared by the latent-delta tests of several packages."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.cvae_runs import cvae_store
from tests.cvae_runs import train_family as train


def tiny_vae(root: Path, store: Path, split: Path) -> Path:
    """A count VAE on the split's training cells (seconds on a CPU)."""
    run = root / "vae"
    assert train("vae", f"data.path={store}", f"split.file={split}", f"run.dir={run}",
                 "model.batch_conditioning=false", "model.n_latent=8", "model.n_hidden=64",
                 "data.batch_size=128", "optim.lr=1e-2", "train.max_steps=300") == 0  # fmt: skip
    return run


def trained_latent_delta(root: Path, *overrides: str, steps: int = 300) -> SimpleNamespace:
    """``cvae_store``, its VAE and a latent-delta run on them."""
    cells, store, split = cvae_store(root)
    vae = tiny_vae(root, store, split)
    run = root / "latent_delta"
    assert train("latent-delta", f"data.path={store}", f"split.file={split}", f"run.dir={run}",
                 f"vae.run={vae}", "data.batch_size=128", "model.hidden=32", "model.depth=2",
                 "model.heads=2", "model.predictor_hidden=[64,64]", "optim.lr=3e-3",
                 f"train.max_steps={steps}", *overrides) == 0  # fmt: skip
    held = json.loads((run / "split.json").read_text())["held_out"]["test_perturbations"]
    return SimpleNamespace(root=root, cells=cells, store=store, split=split, vae=vae, run=run,
                           held=held)  # fmt: skip
