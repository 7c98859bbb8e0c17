"""The one training loop every stage runs through (Accelerate: DDP, DeepSpeed, one process).

Shape of a run: build (accelerator, model, AdamW + schedule, optional EMA) -> maybe resume
-> step until ``train.max_steps`` (accumulate, clip, step, EMA, log, validate, checkpoint)
-> final checkpoint, weights, summary and MLflow artifacts. Steps are optimizer updates.
Only the main process logs, draws the progress bar and writes run-level files; every
collective (metric reduction, checkpoint, validation) is reached by all processes at the
same step, so no rank waits for one that took another branch.

What the console says, in one line each (stderr, main process): what the initial weights
came from (a stage's ``init_report``, e.g. ``init.run``); where a resume started; a
batch skipped for a nan/inf loss (the first, then at most one per ``NONFINITE_EVERY_S``: a
long run is not flooded, the count is in the metrics and ``summary.json``); corrupt data
units the loader skipped; what did not reach MLflow; a stop on SIGTERM/Ctrl-C
(``signals.py``).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, send_to_device, set_seed
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError

from .checkpoint import CheckpointManager, resolve_resume, write_safetensors
from .config import config_to_dict, dump_toml
from .distributed import is_deepspeed, make_accelerator, zero_stage
from .ema import EMA
from .figures import plot_training_curves
from .optim import build_optimizer, build_scheduler
from .signals import StopRequest, TrainingStopped
from .stage import Loader, Stage
from .step_metrics import MetricAverager
from .tracking import default_uri, flatten_config, make_tracker, pip_requirements

__all__ = ["FitResult", "NonFiniteLossError", "TrainingStopped", "fit"]

NONFINITE_EVERY_S = 60.0  # at most one "skipped a non-finite batch" line per minute


class NonFiniteLossError(RuntimeError):
    """Too many consecutive nan/inf losses: the run cannot recover by skipping batches."""


@dataclass
class FitResult:
    run_dir: Path
    step: int
    final_dir: Path
    last_checkpoint: Path | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    cells_per_s: float = 0.0
    tracking_uri: str = ""
    mlflow_run_id: str | None = None
    model: nn.Module | None = None  # this process's trained module (unwrapped)


def _epochs(loader: Loader, epoch: int) -> Iterator[dict]:
    """Batches forever, moving the loader to the next epoch when one ends. Two epochs in a row
    without a batch mean there is nothing to train on: an error, not an endless loop."""
    empty = 0
    while True:
        n = 0
        for n, batch in enumerate(loader, 1):  # noqa: B007 - n counts the batches
            yield batch
        empty = 0 if n else empty + 1
        if empty >= 2:
            raise DataValidationError(
                "training data", "data", "the training loader yields no batch in a whole "
                "epoch (too few cells or groups for the batch or set size, or a split that "
                "leaves no training cells)", "check data.path, the split and data.batch_size",
            )  # fmt: skip
        epoch += 1
        loader.set_epoch(epoch)


def _step_flags(loss: torch.Tensor, accelerator, stop: bool) -> tuple[int, bool]:
    """(processes whose loss is nan/inf, whether any process was asked to stop), from one
    all-reduce: the stop request rides on the reduction the non-finite guard needs anyway,
    so every process learns of it at the same micro-batch and no collective is added."""
    flags = torch.stack(
        [(~torch.isfinite(loss.detach())).to(torch.float32).reshape(()),
         torch.tensor(float(stop), device=loss.device)]
    )  # fmt: skip
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stops = flags.tolist()
    return int(bad), stops > 0


def _say(line: str) -> None:
    """One console line on stderr (stdout carries the command's JSON result)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _dedupe_units(units) -> list[dict[str, str]]:
    """Corrupt data units as ``{"file", "problem"}``, each once, in the order first seen."""
    out, seen = [], set()
    for unit in units:
        if not isinstance(unit, dict):
            continue
        item = {"file": str(unit.get("file", "")), "problem": str(unit.get("problem", ""))}
        key = (item["file"], item["problem"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _init_report(stage: Stage) -> dict[str, Any]:
    """The stage's optional ``init_report()`` (see ``stage.py``), {} without one."""
    hook = getattr(stage, "init_report", None)
    return (hook() if hook else None) or {}


def _store_path(stage: Stage) -> Path | None:
    """The stage's optional ``store`` (see ``stage.py``) when it is a path: the dataset the
    MLflow run records (a stage may keep another kind of store there, as the tests' toy does)."""
    store = getattr(stage, "store", None)
    return Path(store) if isinstance(store, (str, Path)) else None


def _scalar_params(report: dict, prefix: str) -> dict[str, str]:
    """A nested report's scalar entries as flat MLflow params (lists stay in its JSON)."""
    out: dict[str, str] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out |= _scalar_params(value, f"{prefix}{key}.")
        elif value is not None and not isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = str(value)
    return out


def _zero_loss(model: nn.Module) -> torch.Tensor:
    """A loss with zero gradient for every parameter: lets every process run the same
    backward (DDP/DeepSpeed all-reduce) when a batch's loss is not finite."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


@torch.no_grad()
def evaluate(module: nn.Module, loader: Loader, accelerator, step: int, max_batches: int):
    """Cell-weighted means of ``module``'s metrics over the validation loader."""
    averager = MetricAverager()
    was_training = module.training
    module.eval()
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            out = module(send_to_device(batch, accelerator.device), step=step)
            averager.add(out.metrics(), out.n_cells)
    finally:
        module.train(was_training)
    return averager.reduce(accelerator)[0]


def _save_weights(accelerator, model: nn.Module, path: Path) -> None:
    """Full state dict (gathered under ZeRO-3; every process must call) as safetensors."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        write_safetensors(state, path)


def fit(stage: Stage, config: Any, resume: str | None = None) -> FitResult:
    """Train ``stage`` as described by its run config; returns where everything went.

    Raises ``TrainingStopped`` (after saving a checkpoint) when SIGTERM or Ctrl-C asked the
    run to stop, and ``DataValidationError`` when a checkpoint cannot be resumed from."""
    t, run = config.train, config.run
    run_dir = run.dir_path
    accelerator = make_accelerator(t, config.data.batch_size, config.optim.grad_clip)
    main = accelerator.is_main_process

    stage.prepare_data(main)
    accelerator.wait_for_everyone()
    set_seed(t.seed)  # same initial weights on every process
    model = stage.build_model()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, t.max_steps)
    ema = EMA(model, t.ema_decay) if t.ema else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ema is not None:
        ema.averaged.to(accelerator.device)

    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = stage.train_loader(rank, world)
    val_loader = stage.val_loader(rank, world)
    checkpoints = CheckpointManager(
        accelerator, run_dir, t.keep_last, model, optimizer, scheduler, ema
    )

    step, mlflow_run_id, state = 0, None, {}
    resume_path = resolve_resume(resume, run_dir)
    if resume_path is not None:
        state, loader_state = checkpoints.load(resume_path)
        step, mlflow_run_id = int(state["step"]), state.get("mlflow_run_id")
        try:
            train_loader.load_state_dict(loader_state)
        except ValueError as err:  # the data order differs: the checkpoint cannot resume exactly
            if isinstance(err, DataValidationError):
                raise
            raise DataValidationError(
                resume_path / f"loader_rank{accelerator.process_index}.json", "layout", str(err),
                "resume with the store, split, seed, batch size and processes of the run, or "
                "train in a new run.dir",
            ) from err  # fmt: skip
        if main:
            epoch = loader_state.get("epoch")
            _say(f"resumed from {resume_path} at step {step}"
                 + (f" (epoch {epoch})" if epoch is not None else ""))  # fmt: skip
    else:
        if resume and main:
            _say(f"--resume {resume}: no checkpoint in {checkpoints.root}; starting at step 0")
        set_seed(t.seed, device_specific=True)  # different dropout noise per process

    uri = config.tracking.uri or default_uri(run.root_path)
    tracker = make_tracker(config.tracking, uri, main)
    if main:
        init = _init_report(stage)
        for line in init.get("console", []):
            _say(line)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_toml(config, run_dir / "config.toml")
        mlflow_run_id = tracker.start(
            run_name=config.tracking.run_name or run.name or f"{stage.name}-{run_dir.name}",
            params=flatten_config(config_to_dict(config)) | _scalar_params(init, "init."),
            tags={
                "stage": stage.name,
                "world_size": str(world),
                "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": str(accelerator.mixed_precision),
                "run_dir": str(run_dir.resolve()),
            },
            resume_run_id=mlflow_run_id,
        )
        tracker.log_dataset(_store_path(stage))
        if init:
            tracker.log_dict(init, "init.json")

    with StopRequest() as stop:
        try:
            result = _train(
                stage, config, accelerator, model, optimizer, scheduler, ema, train_loader,
                val_loader, checkpoints, tracker, step, mlflow_run_id, state, stop,
            )  # fmt: skip
        except TrainingStopped:
            raise  # the run was ended as KILLED, with a checkpoint
        except BaseException:
            tracker.end("FAILED" if main else "FINISHED")
            if main and (line := tracker.lost_line(run_dir)):
                _say(line)
            raise
    result.tracking_uri, result.mlflow_run_id = uri, mlflow_run_id
    return result


def _train(
    stage, config, accelerator, model, optimizer, scheduler, ema, train_loader, val_loader,
    checkpoints, tracker, step, mlflow_run_id, resume_state, stop,
) -> FitResult:  # fmt: skip
    t, run = config.train, config.run
    run_dir, main = run.dir_path, accelerator.is_main_process
    log_every = max(1, config.tracking.log_every)
    deepspeed = is_deepspeed(accelerator)
    metrics_log = run_dir / "metrics.jsonl"
    corrupt_units = getattr(train_loader, "corrupt_units", None)
    earlier_units = _dedupe_units(resume_state.get("skipped_units") or [])

    def record(metrics: dict[str, float]) -> None:
        if main:
            tracker.log_metrics(metrics, step=step)
            with metrics_log.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def skipped_units() -> list[dict[str, str]]:
        """Every process's corrupt units so far (a collective when the loader reports them)."""
        if corrupt_units is None:
            return earlier_units
        mine = list(corrupt_units())
        found = gather_object(mine) if accelerator.num_processes > 1 else mine
        return _dedupe_units([*earlier_units, *found])

    def save_checkpoint() -> Path:
        tracker.flush()  # MLflow holds every metric up to the checkpoint a resume starts from
        state = {"mlflow_run_id": mlflow_run_id, "stage": stage.name, "skipped_batches": skipped}
        if corrupt_units is not None or earlier_units:
            state["skipped_units"] = skipped_units()
        return checkpoints.save(step, state, train_loader.state_dict())

    def validate() -> dict[str, float]:
        metrics = {}
        if val_loader is None:
            return metrics
        raw = accelerator.unwrap_model(model)
        for prefix, module in (("val", raw), ("val_ema", ema.module if ema else None)):
            if module is not None:
                values = evaluate(module, val_loader, accelerator, step, t.eval_batches)
                metrics.update({f"{prefix}/{k}": v for k, v in values.items()})
        record(metrics)
        return metrics

    from tqdm.auto import tqdm

    bar = tqdm(
        total=t.max_steps,
        initial=step,
        disable=not (main and t.progress),
        desc=f"{stage.name}",
        unit="step",
        mininterval=2.0,
        dynamic_ncols=True,
    )
    averager = MetricAverager()
    batches = _epochs(train_loader, train_loader.state_dict()["epoch"])
    last_checkpoint: Path | None = None
    train_metrics: dict[str, float] = {}
    nonfinite, window_ok, grad_norm, stopping = 0, False, None, False
    skipped = int(resume_state.get("skipped_batches", 0))
    said_nonfinite = -math.inf
    loop_start = last_log = time.perf_counter()
    total_cells = 0.0
    model.train()
    while step < t.max_steps:
        batch = send_to_device(next(batches), accelerator.device)
        with accelerator.accumulate(model):
            out = model(batch, step=step)
            loss = out.loss
            bad, stopping = _step_flags(loss, accelerator, stop.requested)
            if bad:
                nonfinite += 1
                if nonfinite >= t.max_nonfinite or zero_stage(accelerator) == 3:
                    raise NonFiniteLossError(
                        f"{nonfinite} consecutive non-finite losses at step {step}; lower "
                        "optim.lr or raise optim.warmup_steps, then --resume from the last "
                        f"checkpoint in {checkpoints.root}"
                    )
                loss = _zero_loss(model)
                skipped += 1
                if main and time.monotonic() - said_nonfinite >= NONFINITE_EVERY_S:
                    said_nonfinite = time.monotonic()
                    _say(
                        f"step {step}: non-finite loss on {bad} of {accelerator.num_processes} "
                        f"process(es): batch skipped with no update, {skipped} so far (said at "
                        f"most once a minute; train.max_nonfinite={t.max_nonfinite} in a row "
                        "stop the run)"
                    )
            else:
                nonfinite, window_ok = 0, True
                averager.add(out.metrics(), out.n_cells)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if config.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), config.optim.grad_clip
                    )
                finite_grads = grad_norm is None or deepspeed or bool(torch.isfinite(grad_norm))
                if finite_grads and window_ok:  # else: no update at all, not even momentum
                    optimizer.step()
                window_ok = False
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        bar.update(1)
        if step % log_every == 0 or step == t.max_steps:
            means, cells = averager.reduce(accelerator)
            now = time.perf_counter()
            total_cells += cells
            train_metrics = {f"train/{k}": v for k, v in means.items()}
            train_metrics["train/lr"] = scheduler.get_last_lr()[0]
            train_metrics["train/cells_per_s"] = cells / max(now - last_log, 1e-9)
            if grad_norm is not None:
                train_metrics["train/grad_norm"] = float(grad_norm)
            train_metrics["train/skipped_batches"] = float(skipped)
            last_log = now
            record(train_metrics)
            bar.set_postfix(
                loss=f"{means.get('loss', math.nan):.4g}",
                cells_s=f"{train_metrics['train/cells_per_s']:,.0f}",
                refresh=False,
            )
        if stopping and step < t.max_steps:  # every process saw the same flag
            bar.close()
            _stop(accelerator, tracker, stop, step, last_checkpoint, save_checkpoint, run_dir)
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            validate()
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            last_checkpoint = save_checkpoint()
    loop_seconds = time.perf_counter() - loop_start
    bar.close()

    if last_checkpoint is None or not last_checkpoint.name.endswith(f"_{step}"):
        last_checkpoint = save_checkpoint()
    val_metrics = validate()
    units = skipped_units() if corrupt_units is not None or earlier_units else None
    final_dir = run_dir / "final"
    _save_weights(accelerator, model, final_dir / "model.safetensors")
    if ema is not None and main:
        write_safetensors(ema.module.state_dict(), final_dir / "ema.safetensors")
    result = FitResult(
        run_dir=run_dir,
        step=step,
        final_dir=final_dir,
        last_checkpoint=last_checkpoint,
        train_metrics=train_metrics,
        val_metrics=val_metrics,
        cells_per_s=total_cells / max(loop_seconds, 1e-9),
        model=accelerator.unwrap_model(model),
    )
    if main:
        _write_run_files(stage, config, accelerator, ema, tracker, result, skipped, units)
    accelerator.wait_for_everyone()
    return result


def _stop(accelerator, tracker, stop, step, last_checkpoint, save_checkpoint, run_dir):
    """Checkpoint (unless this step's already exists), end MLflow as KILLED, one line, raise."""
    if last_checkpoint is None or last_checkpoint.name != f"step_{step}":
        last_checkpoint = save_checkpoint()
    tracker.end("KILLED")
    signum = stop.signum or int(signal.SIGTERM)  # only another process got the signal
    stopped = TrainingStopped(signum, step, last_checkpoint)
    if accelerator.is_main_process:
        if line := tracker.lost_line(run_dir):
            _say(line)
        _say(f"{stopped}; resume with --resume auto")
    raise stopped


def _summary_tags(checks: dict[str, float], units) -> dict[str, str]:
    """A finished run's single numbers as run tags (``check/<name>``, ``data/skipped_units``),
    not metrics: MLflow's metric charts get one section per key prefix, in key order, so
    one-point ``check/`` and ``data/`` charts sat above the ``train/`` and ``val/`` curves.
    Tags show in the run page's Tags table and as runs-table columns. The final train and
    validation numbers need nothing of their own: both are logged at the last step, so each
    curve's latest value, which the run page's Metrics table and the runs table show, is the
    final one (the former ``final/*`` metrics only doubled the charts)."""
    tags = {f"check/{k}": f"{v:.6g}" for k, v in checks.items()}
    return tags | ({"data/skipped_units": str(len(units))} if units is not None else {})


def _stage_figures(draw, model: nn.Module, run_dir: Path) -> list[Path]:
    """The stage's ``final_figures(model, run_dir)`` PNGs; a figure that fails is one line,
    never a failed run (the weights are saved by then)."""
    try:
        return [Path(p) for p in draw(model, run_dir)]
    except Exception as exc:
        _say(f"stage figures skipped: {type(exc).__name__}: {exc}")
        return []


def _write_run_files(
    stage, config, accelerator, ema, tracker, result: FitResult, skipped: int, units
) -> None:
    """final/ model card, summary.json, the training-curve figure and the stage's figures;
    all logged to MLflow, checks as tags (``_summary_tags``), the model with the run's
    metrics of the last step. Afterwards, if anything did not reach MLflow, summary.json
    says what (``mlflow.lost``) and one console line says where the local copies are."""
    from safetensors.torch import load_file

    run_dir, final_dir = result.run_dir, result.final_dir
    (final_dir / "model_config.json").write_text(json.dumps(stage.model_card(), indent=1))
    figure = plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
    weights = final_dir / ("ema.safetensors" if ema is not None else "model.safetensors")

    def trained_copy() -> torch.nn.Module:
        """A fresh copy loaded from the saved file: works whatever sharding the run used."""
        fresh = stage.build_model()
        fresh.load_state_dict(load_file(str(weights)))
        return fresh

    report, draw = getattr(stage, "final_report", None), getattr(stage, "final_figures", None)
    trained = trained_copy() if report or draw else None  # one copy for checks and figures
    checks = {k: float(v) for k, v in report(trained).items()} if report else {}
    figures = [figure] if figure is not None else []
    figures += _stage_figures(draw, trained, run_dir) if draw else []
    summary = {
        "stage": stage.name,
        "step": result.step,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "cells_per_s": result.cells_per_s,
        "train": result.train_metrics,
        "val": result.val_metrics,
        "skipped_batches": skipped,  # nan/inf losses skipped with no update
        "last_checkpoint": str(result.last_checkpoint),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")),
        "final_weights": str(final_dir / "model.safetensors"),
        "checks": checks,
        **({"init": init} if (init := _init_report(stage)) else {}),
        # where the run is tracked: `latentcell export` logs its bundle to this run
        "mlflow": {"run_id": tracker.run_id, "tracking_uri": tracker.uri or None},
    }
    if units is not None:
        summary["data"] = {"skipped_units": units, "n_skipped_units": len(units)}
        if units:
            first = units[0]
            _say(f"skipped {len(units)} corrupt data unit(s) (data.on_corrupt=skip), first "
                 f"{first['file']}: {first['problem']}; all listed in "
                 f"{run_dir / 'summary.json'}")  # fmt: skip
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    tracker.flush(force=True)  # one try even if the backend failed lately: it may be back
    tracker.set_tags(_summary_tags(checks, units))
    tracker.log_artifact(run_dir / "config.toml")
    tracker.log_artifact(summary_path)
    tracker.log_artifact(final_dir / "model_config.json", "model_card")
    for path in figures:
        tracker.log_artifact(path, "figures")
    if config.tracking.enabled and config.tracking.log_model:
        module, example = stage.serving_module(trained_copy())
        tracker.log_model(module, "model", example, pip_requirements(), step=result.step)
    tracker.end("FINISHED")
    lost = tracker.lost()
    if lost is not None:
        summary["mlflow"]["lost"] = lost
        summary_path.write_text(json.dumps(summary, indent=1))
        _say(tracker.lost_line(run_dir))
