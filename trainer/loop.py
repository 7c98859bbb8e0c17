"""The one training loop every stage runs through (Accelerate: DDP, DeepSpeed, one process).

Shape of a run: build (accelerator, model, AdamW + schedule, optional EMA) -> maybe resume
-> step until ``train.max_steps`` (accumulate, clip, step, EMA, log, validate, checkpoint)
-> final checkpoint, weights, summary and MLflow artifacts. Steps are optimizer updates.
Only the main process logs, draws the progress bar and writes run-level files; every
collective (metric reduction, checkpoint, validation) is reached by all processes at the
same step, so no rank waits for one that took another branch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device, set_seed
from torch import nn

from .checkpoint import CheckpointManager, resolve_resume, write_safetensors
from .config import ConfigError, config_to_dict, dump_toml
from .distributed import is_deepspeed, make_accelerator, zero_stage
from .ema import EMA
from .figures import plot_training_curves
from .optim import build_optimizer, build_scheduler
from .stage import Loader, Stage
from .step_metrics import MetricAverager
from .tracking import default_uri, flatten_config, make_tracker, pip_requirements

__all__ = ["FitResult", "NonFiniteLossError", "fit"]


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
    """Batches forever, moving the loader to the next epoch when one ends."""
    while True:
        yield from loader
        epoch += 1
        loader.set_epoch(epoch)


def _any_rank_nonfinite(loss: torch.Tensor, accelerator) -> bool:
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() > 0)


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
    """Train ``stage`` as described by its run config; returns where everything went."""
    t, run = config.train, config.run
    run_dir = run.dir_path
    accelerator = make_accelerator(t, config.data.batch_size, config.optim.grad_clip)
    main = accelerator.is_main_process
    if t.ema and zero_stage(accelerator) == 3:
        raise ConfigError("train.ema needs full weights on every process: use ZeRO-1/2 or DDP")

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
        accelerator.register_for_checkpointing(ema)

    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = stage.train_loader(rank, world)
    val_loader = stage.val_loader(rank, world)
    checkpoints = CheckpointManager(accelerator, run_dir, t.keep_last)

    step, mlflow_run_id, state = 0, None, {}
    resume_path = resolve_resume(resume, run_dir)
    if resume_path is not None:
        state, loader_state = checkpoints.load(resume_path)
        step, mlflow_run_id = int(state["step"]), state.get("mlflow_run_id")
        train_loader.load_state_dict(loader_state)
    else:
        set_seed(t.seed, device_specific=True)  # different dropout noise per process

    uri = config.tracking.uri or default_uri(run.root_path)
    tracker = make_tracker(config.tracking, uri, main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_toml(config, run_dir / "config.toml")
        mlflow_run_id = tracker.start(
            run_name=config.tracking.run_name or run.name or f"{stage.name}-{run_dir.name}",
            params=flatten_config(config_to_dict(config)),
            tags={
                "stage": stage.name,
                "world_size": str(world),
                "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": str(accelerator.mixed_precision),
                "run_dir": str(run_dir.resolve()),
            },
            resume_run_id=mlflow_run_id,
        )

    try:
        result = _train(
            stage, config, accelerator, model, optimizer, scheduler, ema, train_loader,
            val_loader, checkpoints, tracker, step, mlflow_run_id, state,
        )  # fmt: skip
    except BaseException:
        tracker.end("FAILED" if main else "FINISHED")
        raise
    result.tracking_uri, result.mlflow_run_id = uri, mlflow_run_id
    return result


def _train(
    stage, config, accelerator, model, optimizer, scheduler, ema, train_loader, val_loader,
    checkpoints, tracker, step, mlflow_run_id, resume_state,
) -> FitResult:  # fmt: skip
    t, run = config.train, config.run
    run_dir, main = run.dir_path, accelerator.is_main_process
    log_every = max(1, config.tracking.log_every)
    deepspeed = is_deepspeed(accelerator)
    metrics_log = run_dir / "metrics.jsonl"

    def record(metrics: dict[str, float]) -> None:
        if main:
            tracker.log_metrics(metrics, step=step)
            with metrics_log.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def save_checkpoint() -> Path:
        tracker.flush()  # MLflow holds every metric up to the checkpoint a resume starts from
        return checkpoints.save(
            step,
            {"mlflow_run_id": mlflow_run_id, "stage": stage.name, "skipped_batches": skipped},
            train_loader.state_dict(),
            model,
        )

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
    nonfinite, window_ok, grad_norm = 0, False, None
    skipped = int(resume_state.get("skipped_batches", 0))
    loop_start = last_log = time.perf_counter()
    total_cells = 0.0
    model.train()
    while step < t.max_steps:
        batch = send_to_device(next(batches), accelerator.device)
        with accelerator.accumulate(model):
            out = model(batch, step=step)
            loss = out.loss
            if _any_rank_nonfinite(loss, accelerator):
                nonfinite += 1
                if nonfinite >= t.max_nonfinite or zero_stage(accelerator) == 3:
                    raise NonFiniteLossError(
                        f"{nonfinite} consecutive non-finite losses at step {step}; lower "
                        "optim.lr or raise optim.warmup_steps, then --resume from the last "
                        f"checkpoint in {checkpoints.root}"
                    )
                loss = _zero_loss(model)
                skipped += 1
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
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            validate()
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            last_checkpoint = save_checkpoint()
    loop_seconds = time.perf_counter() - loop_start
    bar.close()

    if last_checkpoint is None or not last_checkpoint.name.endswith(f"_{step}"):
        last_checkpoint = save_checkpoint()
    val_metrics = validate()
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
        _write_run_files(stage, config, accelerator, ema, tracker, result)
    accelerator.wait_for_everyone()
    return result


def _write_run_files(stage, config, accelerator, ema, tracker, result: FitResult) -> None:
    """final/ model card, summary.json, the training-curve figure; all logged to MLflow."""
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

    report = getattr(stage, "final_report", None)
    checks = {k: float(v) for k, v in report(trained_copy()).items()} if report else {}
    summary = {
        "stage": stage.name,
        "step": result.step,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "cells_per_s": result.cells_per_s,
        "train": result.train_metrics,
        "val": result.val_metrics,
        "last_checkpoint": str(result.last_checkpoint),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")),
        "final_weights": str(final_dir / "model.safetensors"),
        "checks": checks,
        # where the run is tracked: `latentcell export` logs its bundle to this run
        "mlflow": {"run_id": tracker.run_id, "tracking_uri": tracker.uri or None},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    tracker.log_metrics(
        {f"final/{k}": v for k, v in {**result.train_metrics, **result.val_metrics}.items()}
        | {f"check/{k}": v for k, v in checks.items()},
        step=result.step,
    )
    tracker.log_artifact(run_dir / "config.toml")
    tracker.log_artifact(run_dir / "summary.json")
    tracker.log_artifact(final_dir / "model_config.json", "model_card")
    if figure is not None:
        tracker.log_artifact(figure, "figures")
    if config.tracking.enabled and config.tracking.log_model:
        module, example = stage.serving_module(trained_copy())
        tracker.log_model(module, "model", example, pip_requirements())
    tracker.end("FINISHED")
