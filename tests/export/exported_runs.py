"""A trained perturbation run's bundle and its test cells, as the family export tests use them."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

from latentcell.trainer.st_stage import split_source_rows


def exported(run: SimpleNamespace, root: Path) -> SimpleNamespace:
    """``run`` (a tiny-run namespace: run, cells, store) with ``meta`` (the export summary,
    written quietly to ``root/bundle``), ``bundle`` and ``test`` (its split's test cells,
    also written to ``root/test.h5ad``)."""
    from latentcell.export.exporters import export_run

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        run.meta = export_run(run.run, root / "bundle")
    run.bundle = root / "bundle"
    run.test = run.cells[split_source_rows(run.run, run.store)["test"]].copy()
    run.test.write_h5ad(root / "test.h5ad")
    return run
