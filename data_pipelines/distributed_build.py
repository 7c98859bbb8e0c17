"""``latentcell data build --scheduler processes|tcp://HOST:PORT``: one part per input, on Dask.

Why: scBaseCount is ~61,000 per-sample h5ad files. The planning pass (obs categories, the
gene vocabulary, optional HVGs) needs every input and stays in this process
(``build_store``); writing the cells is independent per input, so each input becomes its own
part (``build_parts``) written by a Dask worker, and the parts are merged into one store
whose manifest is written last (``merge_parts``). The engine is Dask's: a local cluster of
worker processes, or any running ``distributed`` scheduler (dask-jobqueue, ``dask
scheduler``/``dask worker`` under srun: ``launch/slurm/build_dask.sbatch``).

Layout while building: ``<out>.parts/part-<index>/`` (one finished store per input) and
``<out>.parts/.lock`` (held by the running build; a second build of the same ``out`` stops).
Nothing is at ``out`` until the merged store is renamed there; the parts are removed after.
Restart rule: a re-run with the same inputs and options reuses every finished part and
writes the rest; a changed input (size or modification time), a new position or a changed
store-wide plan (e.g. a new category from another input) rewrites the parts it affects.
Every part is attempted even when one fails, so the re-run after a fix has least to redo.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blocks import StoreSpec
from .build import ObsPlan, WriteSettings
from .build_parts import PartTask, SharedPlan, fingerprint, part_key, plan_digest, write_part
from .errors import DataValidationError
from .h5ad_input import OrderedReadPlan
from .schemas import Schema
from .vocabulary import Vocabulary

log = logging.getLogger(__name__)
INSTALL_FIX = "pip install 'dask[distributed]', or pass --scheduler none"


@dataclass(frozen=True)
class BuildPlan:
    """The planning pass's result (``build_store``): everything the parts are written from."""

    schema: Schema
    obs: ObsPlan
    input_keys: list[np.ndarray]
    stored: Vocabulary
    read_plans: list[OrderedReadPlan]
    spec: StoreSpec
    format: str
    writer_opts: dict
    settings: WriteSettings


def build_distributed(plan: BuildPlan, out, scheduler: str, workers: int | None,
                      overwrite: bool, part_fn=None) -> str:  # fmt: skip
    """Write every input's part on Dask, then merge and publish; returns the store path."""
    out = Path(out).absolute()
    staging = out.parent / f"{out.name}.parts"
    staging.mkdir(parents=True, exist_ok=True)
    lock = _lock(staging, out)
    try:
        start = time.perf_counter()
        with _client(scheduler, workers, len(plan.spec.inputs)) as client:
            summaries, written = _write_parts(client, plan, staging, part_fn or write_part)
            n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
            spec = _final_spec(plan, scheduler, n_workers, written, time.perf_counter() - start)
            path = _merge(client, plan, spec, out, summaries, overwrite)
        print(f"parts: {written} written, {len(summaries) - written} reused, "
              f"on {n_workers} Dask workers")  # fmt: skip
    finally:
        os.close(lock)
    shutil.rmtree(staging, ignore_errors=True)
    return path


def _write_parts(client, plan: BuildPlan, staging: Path, part_fn) -> tuple[list[dict], int]:
    """Submit one task per input; wait for all; raise the first failure (by input order)."""
    from distributed import as_completed

    shared = SharedPlan(plan.schema, plan.obs, plan.stored, plan.spec, plan.format,
                        plan.writer_opts, plan.settings)  # fmt: skip
    tasks = _tasks(plan, shared, staging)
    _remove_unlisted(staging, len(tasks))
    shared_future = client.scatter(shared, broadcast=True)
    futures = [client.submit(part_fn, task, shared_future, pure=False) for task in tasks]
    index = {future.key: i for i, future in enumerate(futures)}
    summaries: list[dict | None] = [None] * len(tasks)
    failed: list[tuple[int, BaseException]] = []
    # results come here as each part ends: a worker that dies later cannot take them along
    for future in as_completed(futures):  # unlike wait(), goes on past a failed part
        i = index[future.key]
        try:
            summaries[i] = future.result()
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            failed.append((i, err))
    if failed:
        log.warning("%d of %d parts failed; finished parts are kept for the re-run",
                    len(failed), len(tasks))  # fmt: skip
        i, err = min(failed, key=lambda f: f[0])
        raise _part_error(tasks[i], err, len(failed), len(tasks))
    written = sum(not s["reused"] for s in summaries)
    return summaries, written


def _tasks(plan: BuildPlan, shared: SharedPlan, staging: Path) -> list[PartTask]:
    digest = plan_digest(shared)
    sizes = [int(rec["n_cells"]) for rec in plan.spec.inputs]
    first_rows = np.concatenate([[0], np.cumsum(sizes)])
    tasks = []
    for i, rec in enumerate(plan.spec.inputs):
        fp = fingerprint(rec["path"])
        mode = plan.read_plans[i].mode
        key = part_key(digest, plan.format, i, fp, int(first_rows[i]), mode)
        tasks.append(PartTask(i, rec["path"], fp, int(first_rows[i]), plan.input_keys[i],
                              plan.read_plans[i], key, str(staging / f"part-{i:06d}")))  # fmt: skip
    return tasks


def _remove_unlisted(staging: Path, n_parts: int) -> None:
    """Parts of inputs this build no longer has (an earlier run with more inputs)."""
    for path in staging.glob("part-*"):
        index = path.name[5:11]
        if path.is_dir() and index.isdigit() and int(index) >= n_parts and ".tmp-" not in path.name:
            shutil.rmtree(path, ignore_errors=True)


def _part_error(task: PartTask, err: BaseException, n_failed: int, n_parts: int) -> BaseException:
    """A user's error as it is; a dead worker as one line that says to re-run."""
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    if isinstance(err, (KilledWorker, FutureCancelledError)):
        return DataValidationError(
            task.path, "worker",
            f"the worker writing this input's part died ({n_failed} of {n_parts} parts failed)",
            "run the same command again: finished parts are kept and only the rest are "
            "written; if it dies again, give the workers more memory",
        )  # fmt: skip
    return err


def _final_spec(plan: BuildPlan, scheduler: str, n_workers: int, written: int,
                seconds: float) -> StoreSpec:  # fmt: skip
    from dataclasses import replace

    options = dict(plan.spec.build_options)
    options["distributed"] = {
        "scheduler": scheduler, "workers": n_workers, "parts": len(plan.spec.inputs),
        "parts_written": written, "parts_reused": len(plan.spec.inputs) - written,
        "parts_seconds": round(seconds, 3),
    }  # fmt: skip
    return replace(plan.spec, build_options=options)


def _merge(client, plan: BuildPlan, spec: StoreSpec, out: Path, summaries: list[dict],
           overwrite: bool) -> str:  # fmt: skip
    from .merge_parts import fill_zarr_range, merge_webdataset, per_cell_arrays, zarr_ranges

    if plan.format == "webdataset":
        return merge_webdataset(out, spec, summaries, overwrite)
    from distributed import wait

    from .zarr_store import ZarrStoreWriter

    writer = ZarrStoreWriter(out, spec, overwrite=overwrite, **plan.writer_opts)
    with writer:
        n_cells = sum(s["n_cells"] for s in summaries)
        nnz = sum(s["nnz"] for s in summaries)
        writer.presize(n_cells, nnz, summaries[0]["nnz_chunk"])
        n_tasks = max(1, len(summaries))
        ranges = zarr_ranges(spec, summaries, writer.chunk_cells, writer.nnz_chunk, n_tasks)
        arrays = per_cell_arrays(spec)
        futures = [client.submit(fill_zarr_range, str(writer.scratch), arrays, r, pure=False)
                   for r in ranges]  # fmt: skip
        wait(futures)
        client.gather(futures)  # raises the first failure; the writer then discards its tmp
        from .merge_parts import category_totals, merged_groups

        offsets = np.concatenate([[0], np.cumsum([s["n_cells"] for s in summaries])])[:-1]
        groups = merged_groups(summaries, [int(o) for o in offsets])
        return writer.finish_presized(groups, category_totals(spec, summaries))


class _client:
    """A Dask client on a new local cluster (``processes``) or a running scheduler."""

    def __init__(self, scheduler: str, workers: int | None, n_inputs: int):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise DataValidationError("latentcell data build", "--scheduler",
                                      f"{scheduler!r} needs dask.distributed, which is not installed",
                                      INSTALL_FIX) from None  # fmt: skip
        self.cluster = None
        if scheduler == "processes":
            import dask

            n = workers or max(1, min(os.cpu_count() or 1, n_inputs))
            # one task per worker at a time: a worker that dies takes only its own part along
            with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
                self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                            host="127.0.0.1", dashboard_address=None,
                                            silence_logs=logging.ERROR)  # fmt: skip
            address = self.cluster.scheduler_address
        else:
            address = scheduler
        try:
            self.client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as err:
            if self.cluster is not None:
                self.cluster.close()
            raise DataValidationError(
                "latentcell data build", "--scheduler", f"cannot reach {address} ({err})",
                "start the Dask scheduler and workers first (launch/slurm/build_dask.sbatch), "
                "or check the address",
            ) from None  # fmt: skip

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _lock(staging: Path, out: Path) -> int:
    """An exclusive flock on ``<out>.parts/.lock`` for this build's lifetime."""
    fd = os.open(staging / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DataValidationError(out, "--out", f"another build of it is running ({staging})",
                                  "wait for it to finish, or choose another --out") from None  # fmt: skip
    return fd
