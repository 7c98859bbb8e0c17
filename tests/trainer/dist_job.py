"""A real training job for the multi-process tests, run under ``accelerate launch``.

Trains the count VAE through the production loop, while recording which store rows this
process was fed and, at the end, this process's own copy of the weights, so the test can
check that ranks saw disjoint data and ended with identical weights.

    accelerate launch ... tests/trainer/dist_job.py OUT --set data.path=STORE ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    from latentcell.trainer.config import load_config
    from latentcell.trainer.loop import fit
    from latentcell.trainer.vae_stage import VAERunConfig, VAEStage

    out = Path(sys.argv[1])
    config = load_config(VAERunConfig, None, sys.argv[2:])
    rows: list[np.ndarray] = []

    class RecordingVAEStage(VAEStage):
        def train_loader(self, rank, world_size):
            loader = super().train_loader(rank, world_size)
            original = loader.dataset.__iter__.__func__

            def recording_iter(dataset):
                for batch in original(dataset):
                    rows.append(batch["row"][~batch["is_pad"]].numpy())
                    yield batch

            loader.dataset.__class__ = type(
                "Recording", (type(loader.dataset),), {"__iter__": recording_iter}
            )
            return loader

    stage = RecordingVAEStage(config)
    result = fit(stage, config)
    rank = PartialState().process_index
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"weights_rank{rank}.safetensors"))
    np.save(out / f"rows_rank{rank}.npy", np.concatenate(rows))
    (out / f"result_rank{rank}.json").write_text(
        json.dumps({"step": result.step, "val": result.val_metrics})
    )


if __name__ == "__main__":
    main()
