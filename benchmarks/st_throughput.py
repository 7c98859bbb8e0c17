"""ST training throughput on CPU: latentcell's STModel, beside Arc's STATE when it is installed.

    latentcell benchmark st-throughput [--threads 2] [--steps 3] [--windows 5]
        [--warmup 2] [--repeats 1] [--shapes state_sm,cpu] [--state-python PY] [--breakdown]
        [--json OUT]

One training step = forward, backward and an optimizer step (lr 1e-4; each tool's own: ours is
``trainer.optim.build_optimizer``'s fused AdamW, STATE's is its ``configure_optimizers``'
Adam) on a batch of
``sets`` random sets of ``set_size`` cells over ``genes`` log1p-expression features, with the
energy-distance set loss (ours: ``SetLossConfig()`` defaults, energy + 0.1 mean-delta). Shapes:

- ``state_sm``: STATE's small model (its ``state_sm.yaml``): 128 cells per set, hidden 672,
  4 layers, 8 heads, MLP x4; 16 sets per batch (its ``training/default.yaml``); 2000 HVGs.
- ``cpu``: a CPU-sized config: 64 cells per set, hidden 128, depth 2, 4 heads, 8 sets, 2000 genes.

Ours runs in each conditioning mode (``joint``: 2S tokens per set; ``cross``: a control
encoder of depth // 2 plus self+cross blocks over S tokens; ``sum``: S tokens, STATE's form). After ``warmup`` untimed steps,
``windows`` windows of ``steps`` steps are timed; seconds per step is the median window / steps.
Sets/s = sets / that; cells/s = sets x set_size / that (predicted perturbed cells per second).
``gflop_per_step`` is torch's FlopCounterMode over one forward+backward: the matmul work, which
explains most of a ratio (it does not count the attention kernel, uncounted on CPU, nor
elementwise ops).

STATE (``arc-state``, CC BY-NC-SA: used as an installed package, nothing copied) cannot live in
our environment, so it runs in its own virtual environment's python, in a subprocess, from the
snippet ``STATE_SNIPPET`` below: its own factory (``state.tx.utils.get_lightning_module``) builds
``StateTransitionPerturbationModel`` from its shipped ``state_sm.yaml`` + ``training/default.yaml``
(width, depth, heads and set size overridden for the ``cpu`` shape), in gene space (HVG input,
ReLU output), one-hot perturbations; it is timed on its own ``training_step`` (geomloss energy)
plus backward and its own optimizer step, with the same warm-up/windows; it keeps its configured dropout (0.1 in
its encoder/decoder MLPs), as ours keeps its default (none). ``--repeats`` alternates ours and STATE
so drifting machine load hits both. Set up its environment as described in ``STATE_SETUP``.
A script, not a test: timings depend on the machine and on what else runs on it (with
``--threads`` equal to busy cores, OpenMP barriers make threaded steps several times slower:
measure on a quiet machine, or with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentcell.models.set_losses import SetLossConfig, set_loss
from latentcell.models.st_model import STConfig, STModel
from latentcell.trainer.optim import build_optimizer
from latentcell.trainer.sections import OptimConfig

N_PERTURBATIONS = 50  # perturbation vocabulary (ours: one-hot table; STATE: one-hot vectors)
N_CELL_TYPES = 3  # our stage conditions on cell type by default
LR = 1e-4  # STATE's training lr; the step cost does not depend on it

# What was found installing arc-state beside the CPU torch (an explanation, never a number).
STATE_SETUP = (
    "arc-state 0.11.1 (PyPI; Requires-Python >=3.11,<3.13; requires torch>=2.7.0, "
    "transformers, geomloss, cell-load, lightning via cell-load, wandb, scanpy, ...) installs "
    "beside torch==2.13.0+cpu without any nvidia/CUDA package: `python3 -m venv "
    "/tmp/venv-state && /tmp/venv-state/bin/pip install torch==2.13.0 && echo torch==2.13.0 > "
    "c.txt && /tmp/venv-state/bin/pip install arc-state -c c.txt` (141 more packages, ~2.5 GB, "
    "~2.5 min). Point --state-python (or LATENTCELL_STATE_PYTHON) at that venv's python."
)
DEFAULT_STATE_PYTHON = "/tmp/venv-state/bin/python"


@dataclass(frozen=True)
class Shape:
    name: str
    set_size: int
    hidden: int
    depth: int
    heads: int
    sets: int
    genes: int
    mlp_ratio: float = 4.0

    @property
    def cells(self) -> int:
        return self.sets * self.set_size


SHAPES = {
    "state_sm": Shape("state_sm", set_size=128, hidden=672, depth=4, heads=8, sets=16, genes=2000),
    "cpu": Shape("cpu", set_size=64, hidden=128, depth=2, heads=4, sets=8, genes=2000),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2, help="torch threads (both models)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="alternations of ours and STATE")
    p.add_argument("--shapes", default="state_sm,cpu", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--modes", default="joint,cross,sum", help="our conditioning modes")
    p.add_argument(
        "--state-python",
        default=os.environ.get("LATENTCELL_STATE_PYTHON", DEFAULT_STATE_PYTHON),
        help="python of a venv with arc-state ('' skips STATE)",
    )
    p.add_argument("--breakdown", action="store_true", help="time our step's parts too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full report here")


# -- data --------------------------------------------------------------------------------------


def random_expression(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """(sets, S, G) log1p-normalized-looking expression: log1p of Poisson counts, ~60% zeros."""
    rates = torch.rand(shape.sets, shape.set_size, shape.genes, generator=generator)
    return torch.log1p(torch.poisson(rates, generator=generator))


def our_batch(shape: Shape, generator: torch.Generator) -> dict:
    """A pair batch as the set sampler delivers it, with features already computed (the same
    preprocessed HVG input STATE gets from cell-load)."""
    return {
        "control": {"features": random_expression(shape, generator)},
        "perturbed": {"features": random_expression(shape, generator)},
        "is_pad": torch.zeros(shape.sets, dtype=torch.bool),
        "perturbation": torch.randint(0, N_PERTURBATIONS, (shape.sets,), generator=generator),
        "cell_type": torch.randint(0, N_CELL_TYPES, (shape.sets,), generator=generator),
    }


def our_model(shape: Shape, mode: str) -> STModel:
    labels = ("non-targeting",) + tuple(f"G{i}" for i in range(1, N_PERTURBATIONS))
    config = STConfig(
        n_features=shape.genes,
        perturbation_labels=labels,
        conditioning=mode,
        hidden=shape.hidden,
        depth=shape.depth,
        heads=shape.heads,
        mlp_ratio=shape.mlp_ratio,
        n_cell_types=N_CELL_TYPES,
    )
    return STModel(config).train()


# -- timing ------------------------------------------------------------------------------------


def timed_windows(step, warmup: int, windows: int, steps: int) -> list[float]:
    """Seconds per step of each timed window, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - start) / steps)
    return out


def rates(shape: Shape, per_step: list[float]) -> dict:
    seconds = statistics.median(per_step)
    return {
        "ms_per_step": 1000 * seconds,
        "sets_per_s": shape.sets / seconds,
        "cells_per_s": shape.cells / seconds,
        "window_ms_per_step": [1000 * s for s in per_step],
    }


def measure_ours(shape: Shape, mode: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = our_model(shape, mode)
    opt = build_optimizer(model, OptimConfig(lr=LR))  # what `latentcell train st` steps with
    batch = our_batch(shape, torch.Generator().manual_seed(args.seed))

    def step():
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    load = os.getloadavg()[0]
    per_step = timed_windows(step, args.warmup, args.windows, args.steps)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss.backward()
    return {
        "tool": "latentcell",
        "shape": shape.name,
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "load_before": load,
        **rates(shape, per_step),
    }


def _fwd_bwd_seconds(fn, params, args) -> float:
    """Median seconds of ``fn()`` forward + backward (grads of ``params`` cleared each time)."""

    def step():
        for p in params:
            p.grad = None
        fn().float().sum().backward()

    return statistics.median(timed_windows(step, args.warmup, args.windows, args.steps))


def breakdown(shape: Shape, mode: str, args) -> dict:
    """Forward+backward milliseconds per step of each part of our model, each timed alone on
    tensors of the shapes it sees in training (the real submodules), plus the AdamW step."""
    torch.manual_seed(args.seed)
    model = our_model(shape, mode)
    batch = our_batch(shape, torch.Generator().manual_seed(args.seed))
    control, target = batch["control"]["features"], batch["perturbed"]["features"]
    b, s, h = shape.sets, shape.set_size, shape.hidden
    tokens = 2 * s if mode == "joint" else s
    x = torch.randn(b, tokens, h, requires_grad=True)
    ctx = torch.randn(b, s, h)
    parts: dict[str, float] = {}

    def add(name: str, fn, modules) -> None:
        params = [p for m in modules for p in m.parameters()]
        parts[name] = parts.get(name, 0.0) + 1000 * _fwd_bwd_seconds(fn, params + [x], args)

    for block in model.blocks:
        add("attention (self)", lambda blk=block: blk.attn(blk.norm1(x)), [block.attn, block.norm1])
        if block.cross is not None:
            add(
                "attention (cross)",
                lambda blk=block: blk.cross(blk.norm_cross(x), ctx),
                [block.cross, block.norm_cross],
            )
        add("mlp", lambda blk=block: blk.mlp(blk.norm2(x)), [block.mlp, block.norm2])
    xc = torch.randn(b, s, h, requires_grad=True)
    for block in model.control_blocks:
        params = [*block.parameters(), xc]
        ms = 1000 * _fwd_bwd_seconds(lambda blk=block: blk(xc), params, args)
        parts["control encoder blocks"] = parts.get("control encoder blocks", 0.0) + ms
    add("cell encoder (genes -> hidden)", lambda: model.cell_encoder(control), [model.cell_encoder])
    add(
        "head (hidden -> genes)",
        lambda: model.head(model.norm(x[:, -s:])),
        [model.head, model.norm],
    )
    pred = (control + 0.1 * torch.randn_like(control)).relu().requires_grad_(True)
    loss_cfg = SetLossConfig()
    parts["set loss (energy + mean)"] = 1000 * _fwd_bwd_seconds(
        lambda: set_loss(loss_cfg, pred, target, control)["total"].mean(), [pred], args
    )
    opt = build_optimizer(model, OptimConfig(lr=LR))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    parts["optimizer step (fused AdamW)"] = 1000 * statistics.median(
        timed_windows(opt.step, args.warmup, args.windows, args.steps)
    )
    return {"shape": shape.name, "mode": mode, "ms_per_step_by_part": parts}


# -- STATE in its own environment --------------------------------------------------------------

# Run by STATE's python: argv[1] is a JSON spec; the last stdout line is "RESULT <json>".
STATE_SNIPPET = r"""
import contextlib, io, json, logging, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from importlib.metadata import version
from importlib.resources import files
from omegaconf import OmegaConf
from state.tx.utils import get_lightning_module

configs = files("state") / "configs"
root = OmegaConf.create({
    "model": OmegaConf.load(configs / "model" / spec["config"]),
    "training": OmegaConf.load(configs / "training" / "default.yaml"),
})
kwargs = OmegaConf.to_container(root.model.kwargs, resolve=True)
training = OmegaConf.to_container(root.training, resolve=True)
S, H, G, B, P = spec["set_size"], spec["hidden"], spec["genes"], spec["sets"], spec["perts"]
if spec["override"]:
    kwargs["cell_set_len"], kwargs["hidden_dim"] = S, H
    backbone = kwargs["transformer_backbone_kwargs"]
    backbone.update(
        max_position_embeddings=S, hidden_size=H, num_hidden_layers=spec["depth"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        head_dim=H // spec["heads"], intermediate_size=int(H * spec["mlp_ratio"]),
    )
training["batch_size"] = B
var_dims = {"input_dim": G, "hvg_dim": G, "gene_dim": G, "output_dim": G, "pert_dim": P,
            "batch_dim": None, "gene_names": None}
data = {"embed_key": None, "output_space": "gene", "basal_mapping_strategy": "random",
        "control_pert": "non-targeting"}
torch.manual_seed(spec["seed"])
with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints the whole module
    model = get_lightning_module("state", data, kwargs, training, var_dims)
model.train()
assert model.cell_sentence_len == S and model.transformer_backbone.config.hidden_size == H
model.lr = spec["lr"]
opt = model.configure_optimizers()  # what its Lightning trainer steps with (Adam)
g = torch.Generator().manual_seed(spec["seed"])
def expression():
    return torch.log1p(torch.poisson(torch.rand(B * S, G, generator=g), generator=g))
codes = torch.randint(0, P, (B,), generator=g)
batch = {
    "pert_emb": torch.nn.functional.one_hot(codes, P).float().repeat_interleave(S, 0),
    "ctrl_cell_emb": expression(),
    "pert_cell_emb": expression(),
}
def step():
    loss = model.training_step(batch, 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
with contextlib.redirect_stdout(io.StringIO()):
    for _ in range(spec["warmup"]):
        step()
    per_step = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        per_step.append((time.perf_counter() - start) / spec["steps"])
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        model.training_step(batch, 0).backward()
backbone = model.transformer_backbone.config
print("RESULT " + json.dumps({
    "per_step": per_step,
    "gflop_per_step": counter.get_total_flops() / 1e9,
    "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    "params": sum(p.numel() for p in model.parameters()),
    "versions": {k: version(k) for k in ("arc-state", "torch", "transformers", "geomloss")},
    "model": {"backbone": type(model.transformer_backbone).__name__,
              "attn_implementation": backbone._attn_implementation,
              "layers": backbone.num_hidden_layers, "heads": backbone.num_attention_heads,
              "intermediate": backbone.intermediate_size, "dropout": model.dropout,
              "n_encoder_layers": model.n_encoder_layers,
              "n_decoder_layers": model.n_decoder_layers,
              "loss": type(model.loss_fn).__name__},
    "threads": torch.get_num_threads(),
}))
"""


def state_status(python: str) -> str | None:
    """None when ``python`` can import STATE's model, else why not."""
    if not python:
        return "skipped (--state-python '')"
    if not Path(python).exists():
        return f"no python at {python}"
    probe = "import state.tx.models.state_transition"
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    if run.returncode:
        return f"{python} cannot import arc-state: {run.stderr.strip().splitlines()[-1:]}"
    return None


def measure_state(shape: Shape, args) -> dict:
    spec = {
        "config": "state_sm.yaml",
        "override": shape.name != "state_sm",
        "set_size": shape.set_size,
        "hidden": shape.hidden,
        "depth": shape.depth,
        "heads": shape.heads,
        "mlp_ratio": shape.mlp_ratio,
        "sets": shape.sets,
        "genes": shape.genes,
        "perts": N_PERTURBATIONS,
        "threads": args.threads,
        "lr": LR,
        "seed": args.seed,
        "warmup": args.warmup,
        "windows": args.windows,
        "steps": args.steps,
    }
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("w", suffix="_state_bench.py", delete=False) as f:
        f.write(STATE_SNIPPET)
    try:
        run = subprocess.run(
            [args.state_python, f.name, json.dumps(spec)], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode or not lines:
        tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
        return {"tool": "state", "shape": shape.name, "error": "\n".join(tail)}
    out = json.loads(lines[-1][len("RESULT ") :])
    per_step = out.pop("per_step")
    return {"tool": "state", "shape": shape.name, "load_before": load, **out,
            **rates(shape, per_step)}  # fmt: skip


# -- report ------------------------------------------------------------------------------------


def machine_info(args) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_at_start": os.getloadavg(),
    }


def summarize(rows: list[dict], shapes: list[Shape], modes: list[str]) -> list[dict]:
    """Per shape and mode: median cells/s over repeats for ours and STATE, ours/STATE, and the
    matmul GFLOP per step of each (the work ratio behind the speed ratio)."""

    def med(tool: str, shape: str, mode: str | None, key: str) -> float | None:
        vals = [
            r[key]
            for r in rows
            if r["tool"] == tool and r["shape"] == shape and r.get("mode") == mode and key in r
        ]
        return statistics.median(vals) if vals else None

    out = []
    for shape in shapes:
        theirs = med("state", shape.name, None, "cells_per_s")
        for mode in modes:
            ours = med("latentcell", shape.name, mode, "cells_per_s")
            out.append({
                "shape": shape.name, "mode": mode, "ours_cells_per_s": ours,
                "state_cells_per_s": theirs,
                "ratio": ours / theirs if ours and theirs else None,
                "ours_gflop_per_step": med("latentcell", shape.name, mode, "gflop_per_step"),
                "state_gflop_per_step": med("state", shape.name, None, "gflop_per_step"),
            })  # fmt: skip
    return out


def print_table(summary: list[dict]) -> None:
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(
        f"{'shape':<10}{'mode':<7}{'ours cells/s':>14}{'STATE cells/s':>15}{'ours/STATE':>12}"
        f"{'GFLOP/step ours':>17}{'STATE':>8}"
    )
    for r in summary:
        print(
            f"{r['shape']:<10}{r['mode']:<7}{num(r['ours_cells_per_s'], ',.0f'):>14}"
            f"{num(r['state_cells_per_s'], ',.0f'):>15}{num(r['ratio'], '.2f') + ('x' if r['ratio'] else ''):>12}"
            f"{num(r['ours_gflop_per_step'], '.1f'):>17}{num(r['state_gflop_per_step'], '.1f'):>8}"
        )
    print("target: ours/STATE >= 1.5x (cells/s, same shapes, same threads)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    shapes = [SHAPES[name.strip()] for name in args.shapes.split(",") if name.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    machine = machine_info(args)
    print(json.dumps({"environment": machine}))
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + args.threads > cores:
        print(f"note: load {load:.1f} on {cores} cores; busy cores slow threaded torch most")
    why_not = state_status(args.state_python)
    if why_not:
        print(json.dumps({"state": f"not measured: {why_not}", "setup": STATE_SETUP}))
    rows, parts = [], []
    for shape in shapes:
        print(json.dumps({"shape": dataclasses.asdict(shape)}), flush=True)
        for r in range(args.repeats):
            for mode in modes:
                row = measure_ours(shape, mode, args)
                print(json.dumps({"repeat": r, **row}), flush=True)
                rows.append(row)
            if not why_not:
                row = measure_state(shape, args)
                print(json.dumps({"repeat": r, **row}), flush=True)
                rows.append(row)
        if args.breakdown:
            for mode in modes:
                part = breakdown(shape, mode, args)
                print(json.dumps(part), flush=True)
                parts.append(part)
    summary = summarize(rows, shapes, modes)
    print_table(summary)
    if why_not:
        print(f"STATE not measured: {why_not}\n{STATE_SETUP}")
    if args.json:
        report = {
            "args": vars(args),
            "machine": machine,
            "shapes": [dataclasses.asdict(s) for s in shapes],
            "state": {"measured": not why_not, "why_not": why_not, "setup": STATE_SETUP},
            "summary": summary,
            "runs": rows,
            "breakdown": parts,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from latentcell.benchmarks.cli import standalone

    raise SystemExit(standalone(__doc__, add_arguments, run))
