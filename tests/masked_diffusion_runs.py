"""A tiny masked-diffusion run on the synthetic perturbation store of ``cvae_runs``, shared by
the masked-diffusion tests of several packages (stage, predictor, export)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.cvae_runs import cvae_store
from tests.cvae_runs import train_family as train


def trained_masked_diffusion(root: Path, *overrides: str, steps: int = 200) -> SimpleNamespace:
    """``cvae_store`` and a masked-diffusion run on it (sets of 16, hidden 32, 8 bins:
    seconds on a CPU); ``overrides`` are further ``--set`` items."""
    cells, store, split = cvae_store(root)
    run = root / "masked_diffusion"
    assert train("masked-diffusion", f"data.path={store}", f"split.file={split}",
                 f"run.dir={run}", "data.set_size=16", "data.sets_per_batch=4",
                 "model.hidden=32", "model.depth=2", "model.heads=2", "model.control_depth=1",
                 "model.n_bins=8", "optim.lr=3e-3", f"train.max_steps={steps}",
                 *overrides) == 0  # fmt: skip
    held = json.loads((run / "split.json").read_text())["held_out"]["test_perturbations"]
    return SimpleNamespace(root=root, cells=cells, store=store, split=split, run=run, held=held)
