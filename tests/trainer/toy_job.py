"""The toy stage on two processes, for ``torchrun --nproc_per_node 2 toy_job.py RUN_DIR MODE``.

``first``: process 1 alone gets SIGTERM before its 7th batch, and each process's loader finds
its own corrupt units; both processes must stop at step 7. ``resume``: ``--resume auto`` to
step 20. Each process writes ``RUN_DIR/../outcome_rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

UNITS = [
    {"file": "chunk 3", "problem": "cannot decompress"},
    {"file": "chunk 9", "problem": "sha256 mismatch"},
    {"file": "chunk 4", "problem": "truncated"},
]


def main() -> None:
    from accelerate import PartialState

    from latentcell.trainer.config import load_config
    from latentcell.trainer.loop import TrainingStopped, fit
    from tests.trainer.toy_stage import ToyRunConfig, ToyStage

    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    config = load_config(ToyRunConfig, None, [
        f"run.dir={run_dir}", "train.progress=false", "tracking.log_every=5",
        "train.max_steps=20", "train.checkpoint_every=5",
    ])  # fmt: skip
    rank = int(os.environ["RANK"])

    def signal_one(batches: int) -> None:
        if mode == "first" and rank == 1 and batches == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    found = {0: {1: UNITS[0], 3: UNITS[1]}, 1: {2: UNITS[0], 5: UNITS[2]}}[rank]
    stage = ToyStage(config, on_batch=signal_one, corrupt_at=found if mode == "first" else {})
    outcome: dict = {"rank": rank}
    try:
        outcome["step"] = fit(stage, config, resume="auto" if mode == "resume" else None).step
    except TrainingStopped as stopped:
        outcome.update(stopped=stopped.step, signum=stopped.signum)
    outcome["process_index"] = PartialState().process_index
    (run_dir.parent / f"outcome_rank{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main()
