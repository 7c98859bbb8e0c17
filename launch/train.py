"""``latentcell train <stage>``: resolve the run config, then hand it to the one loop.

    latentcell train vae [--config F.toml] [--set data.path=STORE --set run.dir=DIR ...]
                         [--resume auto|PATH] [--print-config]

Identical under ``accelerate launch [args] -m latentcell.launch train vae ...``: the
launcher's environment decides DDP / DeepSpeed / nodes, never this command.

A run stopped by SIGTERM or Ctrl-C saves a checkpoint, says so in one line, and exits with
128 + the signal's number (143, 130), as a process killed by it would.
"""

from __future__ import annotations

import argparse
import json


def _stages() -> dict:
    from latentcell.trainer.dit_stage import DiTRunConfig, DiTStage
    from latentcell.trainer.st_pretrain_stage import STPretrainRunConfig, STPretrainStage
    from latentcell.trainer.st_stage import STRunConfig, STStage
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    return {
        "vae": (VAERunConfig, VAEStage),
        "dit": (DiTRunConfig, DiTStage),
        "st": (STRunConfig, STStage),
        "st-pretrain": (STPretrainRunConfig, STPretrainStage),
    }


STAGE_NAMES = ("vae", "dit", "st", "st-pretrain")


def add_train_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a model (one stage) with the shared loop")
    parser.add_argument("stage", choices=STAGE_NAMES, help="what to train")
    parser.add_argument("--config", help="TOML run config (every key has a default)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.max_steps=200 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest checkpoint of run.dir, or a fresh start) or a checkpoint dir",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from latentcell.trainer.config import config_to_dict, load_config
    from latentcell.trainer.loop import TrainingStopped, fit

    config_cls, stage_cls = _stages()[args.stage]
    config = load_config(config_cls, args.config, args.overrides)
    if args.print_config:
        import tomli_w

        print(tomli_w.dumps(config_to_dict(config)), end="")
        return 0
    try:
        result = fit(stage_cls(config), config, resume=args.resume)
    except TrainingStopped as stopped:  # its line is already printed
        return stopped.exit_code
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            json.dumps(
                {
                    "run_dir": str(result.run_dir),
                    "step": result.step,
                    "final_weights": str(result.final_dir / "model.safetensors"),
                    "val": result.val_metrics,
                    "cells_per_s": round(result.cells_per_s, 1),
                    "mlflow_tracking_uri": result.tracking_uri,
                    "mlflow_run_id": result.mlflow_run_id,
                }
            )
        )
    return 0
