"""The latent-shift family's training (seed 004): one pass, no loop, any predictor.

    latentcell train latent-shift --set data.path=STORE --set split.file=SPLIT.toml \\
        --set run.dir=DIR [--set model.predictor=pkg.module:Class]

1. The split's train rows of the store (``split.file``; without one, 10% of every (cell
   type, perturbation) group is held out for validation, as ``train st`` does), read into
   memory as log1p-normalized expression: the family is for data that fits in memory.
2. The embedding: PCA fitted on the training cells' log1p, or the posterior means of the
   count VAE ``vae.run`` (``model.embedding``). Neither sees a validation cell.
3. Pairing (``latent_shift_cells.pair_cells``): each perturbed training cell gets a
   training control of its (cell type, batch), else of its cell type: ``random`` (the set
   sampler's rule) or ``ot`` (default: an optimal-transport match in the embedding, which
   keeps the predicted cells' spread; the rules and their measurement are documented there).
4. ``predictor.train(ctrl_emb, pert_emb, descriptors, **options)``; validation: for each
   held-out (perturbation, cell type, batch), its controls (held-out ones, else training
   ones) are predicted and the mean compared with the real cells' mean: ``mse_mean`` in the
   embedding (``mse_mean_control``: the no-effect prediction's, for scale), ``energy``:
   the energy distance of the predicted to the real cells in the embedding (the spread, which
   the pairing rule decides), and ``pearson_delta`` of the decoded mean shift on the genes.
5. The run directory is built beside ``run.dir`` and renamed into place (``AtomicDir``):
   config.toml, split.npz/json, final/ (model card, predictor.npz, latent_shift.npz),
   summary.json; one MLflow run (params: the config; metrics: val) from the main process.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.latent_shift import (
    DESCRIPTORS,
    MODEL_CLASS,
    Descriptors,
    LatentShiftRun,
    PCAEmbedding,
    make_predictor,
)

from .config import config_to_dict, dump_toml
from .latent_shift_cells import TrainingCells, decoder, validation_metrics
from .sections import RunSection, SplitFileSection, VAERef, split_card
from .tracking import TrackingConfig, default_uri, flatten_config, make_tracker

__all__ = ["LatentShiftRunConfig", "train_latent_shift"]

DEFAULT_PREDICTOR = "latentcell.models.latent_shift:ConditionalMLP"
EMBEDDINGS, DECODES, PAIRINGS = ("pca", "vae"), ("shift", "full"), ("ot", "random")
DEFAULT_SPLIT = {"split": {"seed": 0, "cells": {"val_fraction": 0.1, "test_fraction": 0.0}}}


@dataclass(frozen=True)
class LatentShiftDataSection:
    """path: a perturbation store ("" = the built-in one). max_cells: a seeded cap on the
    training cells read (0 = all), for quick runs on large stores."""

    path: str = ""
    max_cells: int = 0


@dataclass(frozen=True)
class LatentShiftModelSection:
    """predictor: any ``pkg.module:Class`` implementing ``PerturbationPredictor``.
    embedding: pca (``n_components`` of the training log1p) or vae (``vae.run``'s latent).
    decode (pca): shift adds the decoded change to each control's expression, full is the
    plain inverse. pairing: ot or random (module docstring). descriptor: onehot, gene_table
    or external (``embeddings_file``: the ST's gene -> vector formats). hidden: the
    reference MLP's layer widths."""

    predictor: str = DEFAULT_PREDICTOR
    embedding: str = "pca"
    n_components: int = 32
    decode: str = "shift"
    pairing: str = "ot"
    ot_max: int = 512
    descriptor: str = "onehot"
    embeddings_file: str = ""
    hidden: tuple[int, ...] = (128, 128)

    def __post_init__(self) -> None:
        for name, allowed in (("embedding", EMBEDDINGS), ("decode", DECODES),
                              ("pairing", PAIRINGS), ("descriptor", DESCRIPTORS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (self.descriptor == "external") != bool(self.embeddings_file):
            raise ValueError("descriptor=external needs embeddings_file, and only it reads one")
        if self.n_components < 1 or self.ot_max < 2 or min(self.hidden, default=1) < 1:
            raise ValueError("n_components >= 1, ot_max >= 2, hidden widths >= 1")


@dataclass(frozen=True)
class LatentShiftTrainSection:
    """The predictor's options (passed to ``train`` as keyword arguments) and the seed of
    everything random (PCA, pairing, the predictor)."""

    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0 or self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("seed >= 0, max_steps >= 1, batch_size >= 1, lr > 0")


@dataclass(frozen=True)
class LatentShiftRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/latent-shift"))
    data: LatentShiftDataSection = field(default_factory=LatentShiftDataSection)
    split: SplitFileSection = field(default_factory=SplitFileSection)
    vae: VAERef = field(default_factory=VAERef)
    model: LatentShiftModelSection = field(default_factory=LatentShiftModelSection)
    train: LatentShiftTrainSection = field(default_factory=LatentShiftTrainSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def train_latent_shift(config: LatentShiftRunConfig, resume: str | None = None) -> dict:
    """Train one run (module docstring); returns the family summary (``families.train``)."""
    from accelerate import PartialState

    from latentcell.data_pipelines.split_files import open_count_store

    from .builtin_data import CountStoreInput

    if resume not in (None, "auto"):
        raise DataValidationError(
            "--resume", resume, "a latent-shift run trains in one pass and keeps no checkpoints",
            "drop --resume",
        )  # fmt: skip
    m, t = config.model, config.train
    if not PartialState().is_main_process:  # one pass on one process: other ranks idle
        return {"run_dir": str(config.run.dir_path)}
    predictor = make_predictor(m.predictor)  # a bad plug-in fails before any data is read
    store = CountStoreInput(config.data.path, config.run.root_path).ensure_store()
    reader = open_count_store(store, "data.path")
    meta = reader.meta
    if not meta.roles.get("perturbation") or meta.control_label is None:
        raise DataValidationError(
            store, "roles.perturbation", "the store has no perturbation column with a control "
            "label", "build it with latentcell data build --schema vcc",
        )  # fmt: skip
    rng = np.random.default_rng(t.seed)
    split, cells, is_train = _read_split(config, reader, rng)
    bridge, pca = None, None
    if m.embedding == "vae":
        bridge = _bridge(config, meta.n_genes)
        emb = bridge.encode_numpy(cells.x)
    else:
        pca = PCAEmbedding.fit(cells.x[is_train], m.n_components, t.seed)
        emb = pca.encode(cells.x)
    labels = meta.categories[meta.roles["perturbation"]]
    descriptors = Descriptors.build(m.descriptor, labels, meta.control_label, m.embeddings_file)
    p, c, unpaired = cells.pairs(emb, np.flatnonzero(is_train), m, rng)
    if not len(p):
        raise DataValidationError(
            store, "training cells", "no perturbed training cell has a control of its cell type",
            "keep control cells of every cell type in training",
        )  # fmt: skip
    start = time.perf_counter()
    predictor.train(
        emb[c], emb[p], descriptors.matrix(cells.pert[p]), seed=t.seed, hidden=m.hidden,
        max_steps=t.max_steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
        progress=_progress(t),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    run = LatentShiftRun(predictor, descriptors, pca)
    trained = sorted(set(cells.pert[is_train]), key=labels.index)
    val = validation_metrics(run, cells, emb, is_train, trained, decoder(run, bridge, m.decode))
    card = _model_card(config, meta, store, cells, is_train, trained, run, bridge)
    card["pairing"] = {"rule": m.pairing, "ot_max": m.ot_max, "pairs": len(p), "unpaired": unpaired}
    train = {"pairs": len(p), "unpaired": unpaired, "seconds": round(seconds, 3)}
    return _write_run(config, split, run, card, val, train)


def _read_split(config: LatentShiftRunConfig, reader, rng):
    """The split (``split.file``, or the default 10% validation), and its train (at most
    ``data.max_cells`` of them) and val cells in memory; ``is_train`` marks the former."""
    from latentcell.data_pipelines.perturbation_splits import (
        SplitConfig,
        assign_split,
        load_split_config,
    )

    if config.split.file:
        split_config = load_split_config(config.split.file)
    else:
        split_config = SplitConfig.from_dict(DEFAULT_SPLIT, "<default split>")
    split = assign_split(reader, split_config)
    train_rows = split.train
    if config.data.max_cells and len(train_rows) > config.data.max_cells:
        train_rows = np.sort(rng.choice(train_rows, config.data.max_cells, replace=False))
    cells = TrainingCells(reader, np.union1d(train_rows, split.val))
    return split, cells, np.isin(cells.rows, train_rows)


def _model_card(config, meta, store, cells, is_train, trained, run, bridge) -> dict:
    """What ``predict --run`` needs besides the arrays: genes, roles, vocabularies, the
    trained labels (the predictor refuses the others), the embedding, the descriptors."""
    from .st_sections import store_card

    m = config.model
    if bridge is not None:
        embedding = {"kind": "vae", "n_latent": bridge.n_latent, "vae": bridge.provenance}
    else:
        n = int(run.pca.components.shape[0])
        embedding = {"kind": "pca", "n_components": n, "decode": m.decode}
    return {
        "class": MODEL_CLASS,
        "config": config_to_dict(config),
        "predictor": m.predictor,
        **store_card(meta, ("perturbation", "cell_type", "batch")),
        "control_label": meta.control_label,
        "store": str(Path(store).absolute()),
        "trained_perturbations": trained,
        "trained_cell_types": sorted(set(cells.cell_type[is_train & ~cells.is_control])),
        "embedding": embedding,
        "descriptors": {
            "kind": m.descriptor,
            "keys": run.descriptors.keys,
            "file": m.embeddings_file,
        },  # fmt: skip
    }


def _write_run(config, split, run: LatentShiftRun, card: dict, val: dict, train: dict) -> dict:
    """The run directory, all at once (``AtomicDir``), and its MLflow run; the summary."""
    from latentcell.data_pipelines.atomic import AtomicDir
    from latentcell.data_pipelines.perturbation_splits import save_split

    run_dir, steps = config.run.dir_path, config.train.max_steps
    uri = config.tracking.uri or default_uri(config.run.root_path)
    tracker = make_tracker(config.tracking, uri, True)
    try:
        run_id = tracker.start(
            run_name=config.tracking.run_name or config.run.name or f"latent-shift-{run_dir.name}",
            params=flatten_config(config_to_dict(config)),
            tags={
                "stage": "latent-shift",
                "family": "latent-shift",
                "run_dir": str(run_dir.resolve()),
            },  # fmt: skip
        )
        tracker.log_dataset(card["store"])  # the run's dataset input, as the loop logs it
        tracker.log_metrics({f"val/{k}": v for k, v in val.items()}, step=steps)
        summary = {
            "stage": "latent-shift",
            "run_dir": str(run_dir),
            "step": steps,
            "final_weights": str(run_dir / "final" / LatentShiftRun.PREDICTOR_FILE),
            "val": val,
            "cells_per_s": round(train["pairs"] / max(train["seconds"], 1e-6), 1),
            "train": train,
            "mlflow_tracking_uri": uri,
            "mlflow_run_id": run_id,
        }
        with AtomicDir(run_dir, overwrite=True) as build:
            dump_toml(config, build.tmp / "config.toml")
            save_split(split, build.tmp)
            card["split"] = split_card(build.tmp / "split.npz")
            (build.tmp / "final").mkdir()
            run.save(build.tmp / "final", config.model.predictor)
            (build.tmp / "final" / "model_config.json").write_text(json.dumps(card, indent=1))
            (build.tmp / "summary.json").write_text(json.dumps(summary, indent=1))
            build.commit()
        tracker.log_artifact(run_dir / "config.toml")
        tracker.log_artifact(run_dir / "summary.json")
        tracker.log_artifact(run_dir / "final" / "model_config.json", "model_card")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return summary


def _bridge(config: LatentShiftRunConfig, n_genes: int):
    """The count VAE of ``vae.run``, checked against the store's genes."""
    from latentcell.inference.vae_bridge import VAEBridge

    if not config.vae.run:
        raise DataValidationError(
            "latentcell train latent-shift", "vae.run", "model.embedding=vae needs a trained "
            "count VAE", "pass --set vae.run=VAE_RUN_DIR (a finished latentcell train vae)",
        )  # fmt: skip
    bridge = VAEBridge(config.vae.run, config.vae.weights)
    if bridge.n_genes != n_genes:
        raise DataValidationError(
            config.vae.run, "n_genes", f"the store has {n_genes} genes, the VAE {bridge.n_genes}",
            "pass the VAE trained on this store (vae.run)",
        )  # fmt: skip
    return bridge


def _progress(t: LatentShiftTrainSection):
    if not t.progress:
        return None
    every = max(1, t.max_steps // 10)

    def report(step: int, loss: float) -> None:
        if step % every == 0 or step == t.max_steps:
            print(f"latent-shift step {step}/{t.max_steps} loss {loss:.4f}", file=sys.stderr)

    return report
