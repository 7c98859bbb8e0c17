"""The prepared GPU check: the VAE, the DiT and the ST, each trained for a few hundred steps
through the shared loop (bf16 where the GPU has it), reported as training cells/s and model
FLOPs utilization (MFU).

    bash launch/gpu_check.sh [OUT]       # what to run on a GPU machine (under 5 minutes)
    latentcell benchmark gpu-check --out DIR [--steps N] [--store STORE] [--tiny]

Without a GPU the same path runs on the CPU (20 steps by default; ``--tiny`` shrinks the
models to CI size), so the script cannot rot between GPU loans; MFU is then left out, as a CPU
has no peak worth quoting. Writes ``results.json`` and ``results.md`` into ``--out``.

Model FLOPs per trained cell follow the PaLM convention (forward + backward = 3 x forward,
2 FLOPs per multiply-add): ``6 x parameters x tokens`` plus attention, ``12 x depth x width x
tokens x context``. The VAE is one token per cell; the DiT cuts the latent into
``ceil(n_latent / patch_size)`` tokens that attend to each other; the ST is one token per cell
attending to its set (``data.set_size``). Parameters are counted from the run's saved
weights, so the figure is the model that trained, not a formula's guess of it. MFU =
FLOPs per cell x cells/s / the GPU's dense bf16 peak (table below, by device name).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}  # fmt: skip
FAMILIES = ("vae", "dit", "st")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the runs and results")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per family (default: 300 on a GPU, 20 on a CPU)")  # fmt: skip
    parser.add_argument("--store", default="",
                        help="a perturbation count store (default: the built-in synthetic set)")  # fmt: skip
    parser.add_argument("--compute-steps", type=int, default=200,
                        help="on a GPU, also time this many steps on one resident batch "
                        "(the cells/s a loader must feed; 0 skips)")  # fmt: skip
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="multiply each family's default batch (VAE/DiT cells, ST sets)")  # fmt: skip
    parser.add_argument("--no-tracking", action="store_true",
                        help="train without MLflow (a GPU image without it)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true",
                        help="CI-sized models (the CPU fallback's test)")  # fmt: skip


def _overrides(family: str, args, vae_run: Path, tiny: bool) -> list[str]:
    common = [f"data.path={args.store}", f"run.dir={Path(args.out) / family}",
              f"train.max_steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0",
              "train.progress=false", f"tracking.uri=sqlite:///{Path(args.out).resolve() / 'mlflow.db'}",
              "tracking.log_model=false"]  # fmt: skip
    if args.no_tracking:
        common.append("tracking.enabled=false")
    sizes = {
        "vae": ["model.n_hidden=32"],
        "dit": ["model.hidden=32", "model.depth=1", "model.heads=2"],
        "st": ["model.hidden=32", "model.depth=1", "model.heads=2", "data.set_size=16",
               "data.sets_per_batch=4"],
    }  # fmt: skip
    extra = [f"vae.run={vae_run}"] if family in ("dit", "st") else []

    if family == "st":
        extra.append("model.space=gene")
    return common + extra + (sizes[family] if tiny else [])


def _parameters(run_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run_dir / "final" / "model.safetensors"), framework="numpy") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def flops_per_cell(family: str, config, n_params: int, n_latent: int) -> float:
    """Training FLOPs per cell (see the module docstring for the convention)."""
    m = config.model
    if family == "vae":
        return 6.0 * n_params
    if family == "dit":
        tokens = math.ceil(n_latent / m.patch_size)
        return 6.0 * n_params * tokens + 12.0 * m.depth * m.hidden * tokens * tokens
    return 6.0 * n_params + 12.0 * m.depth * m.hidden * config.data.set_size


def cells_per_step(family: str, config) -> int:
    """Cells read from the store for one optimizer step (an ST step reads control and
    perturbed sets)."""
    d = config.data
    if family == "st":
        return 2 * d.sets_per_batch * d.set_size
    return d.batch_size


def compute_only(family, config, steps: int, device: str = "cuda") -> dict:
    """Optimizer steps on one batch already on the GPU (bf16 autocast, AdamW): the cells/s a
    loader must deliver per GPU to keep this model busy (the loop's own figure above is
    bounded by whichever is slower, the loader or the GPU)."""
    import torch
    from accelerate.utils import send_to_device

    stage = family.load("stage")(config)
    stage.prepare_data(True)
    model = stage.build_model().to(device).train()
    batch = send_to_device(next(iter(stage.train_loader(0, 1))), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(i: int) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(batch, step=i).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(min(10, steps)):  # warm-up: kernels, allocator
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    seconds = (time.perf_counter() - start) / steps
    cells = cells_per_step(family.name, config)
    return {"compute_only_step_ms": round(seconds * 1e3, 3), "cells_per_step": cells,
            "compute_only_cells_per_s": round(cells / seconds)}  # fmt: skip


def device_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name.replace(" ", "")), None)
    return name, peak


def run(args: argparse.Namespace) -> int:
    from latentcell.families import family_named
    from latentcell.families.train import load_family_config, train_family
    from latentcell.trainer.builtin_data import ensure_builtin_store
    from latentcell.trainer.distributed import resolve_precision

    if args.batch_scale < 1 or args.compute_steps < 0:
        from latentcell.data_pipelines.errors import UserInputError

        raise UserInputError("--batch-scale must be >= 1 and --compute-steps >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, peak = device_peak()
    if args.steps is None:
        args.steps = 20 if device == "cpu" else 300
    if not args.store:
        args.store = str(ensure_builtin_store(out))
    rows, n_latent = [], 0
    for name in FAMILIES:
        family = family_named(name)
        overrides = _overrides(name, args, out / "vae", args.tiny)
        config = load_family_config(family, None, overrides)
        if args.batch_scale != 1:  # bigger steps than the defaults: what fills a large GPU
            key = "sets_per_batch" if name == "st" else "batch_size"
            value = getattr(config.data, key) * args.batch_scale
            config = load_family_config(family, None, [*overrides, f"data.{key}={value}"])
        if name == "vae":
            n_latent = config.model.n_latent
        start = time.perf_counter()
        summary = train_family(family, config)
        wall = time.perf_counter() - start
        n_params = _parameters(Path(summary["run_dir"]))
        per_cell = flops_per_cell(name, config, n_params, n_latent)
        achieved = per_cell * summary["cells_per_s"]
        rows.append({
            "family": name, "steps": summary["step"], "wall_s": round(wall, 1),
            "cells_per_s": summary["cells_per_s"], "parameters": n_params,
            "flops_per_cell": per_cell, "achieved_tflops": achieved / 1e12,
            "mfu": None if peak is None else achieved / peak,
            "precision": resolve_precision(config.train.mixed_precision),
        })  # fmt: skip
        if device != "cpu" and args.compute_steps:
            rows[-1].update(compute_only(family, config, args.compute_steps))
        print(json.dumps(rows[-1]), flush=True)
    report = {"device": device, "peak_bf16_flops": peak, "steps": args.steps,
              "batch_scale": args.batch_scale,
              "tiny": args.tiny, "store": args.store, "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(report))
    print(_markdown(report), end="")
    return 0


def _markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']} ({report['steps']} steps per family)", "",
             "| family | parameters | cells/s | model TFLOP/s | MFU | wall s | "
             "compute-only cells/s (step ms) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        mfu = "n/a (CPU)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        compute = (f"{r['compute_only_cells_per_s']:,} ({r['compute_only_step_ms']})"
                   if "compute_only_cells_per_s" in r else "")  # fmt: skip
        lines.append(f"| {r['family']} | {r['parameters']:,} | {r['cells_per_s']:,.0f} | "
                     f"{r['achieved_tflops']:.3f} | {mfu} | {r['wall_s']} | {compute} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
