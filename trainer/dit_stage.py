"""The latent-diffusion training stage: VAE latents of the store, then a DiT on them.

``prepare_data`` (main process) encodes the count store with a trained VAE into a latent
store under ``<run.dir>/latents`` (reused while the store and the VAE weights are unchanged)
and computes the training statistics (latent scale, continuous-condition scaling, the
library-size model) into ``<run.dir>/latent_stats.json``. Training then streams latents
through the same ``CellStream`` and the same kind of validation split as the VAE stage
(``val_split``: read units, or cells stratified by ``data.stratify`` plus the DiT's
``model.conditions``; the same cells as the VAE's when its settings are equal and the
conditions are roles, else a warning), or, with ``split.file``, the train / val rows of that
perturbation split (assigned on the count store, as ``train st`` does; the latent store
mirrors the count store's rows and units, so ``row_subset.RowSubset`` over it selects the same
cells). The training statistics come from the training cells only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentcell.data_pipelines.batches import csr_to_torch
from latentcell.data_pipelines.cell_split import resolve_columns
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.latent_store import (
    LatentStoreReader,
    source_fingerprint,
    write_latent_store,
)
from latentcell.data_pipelines.perturbation_splits import SPLIT_ROWS, assign_split, save_split
from latentcell.data_pipelines.row_subset import rows_digest, split_sources
from latentcell.data_pipelines.stores import open_store
from latentcell.data_pipelines.unit_split import subset_factory
from latentcell.inference.model_builders import LATENT_DIFFUSION_CLASS, build_latent_diffusion
from latentcell.inference.trained_runs import load_model_card, load_vae, read_run_json
from latentcell.models.diffusion import DiffusionConfig
from latentcell.models.dit import DiTConfig
from latentcell.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig

from . import val_split
from .builtin_data import CountStoreInput
from .config import ConfigError, tomllib
from .latent_stats import training_stats
from .sections import (
    DataConfig,
    OptimConfig,
    RunSection,
    SplitFileSection,
    TrainConfig,
    VAERef,
    check_split_section,
    split_card,
)
from .tracking import TrackingConfig

__all__ = ["DiTModelSection", "DiTRunConfig", "DiTStage", "VAERef", "build_latent_diffusion"]

MODEL_CLASS = LATENT_DIFFUSION_CLASS
CHECK_LABELS = 8  # the memorization check samples the most frequent labels ...
CHECK_SAMPLES = 256  # ... this many latents each ...
CHECK_TRAIN = 5000  # ... against at most this many training latents of the label


@dataclass(frozen=True)
class DiTModelSection:
    """conditions: categorical obs columns (or role names: cell_type, perturbation, batch)
    the DiT is conditioned on; continuous: numeric obs columns (time, coordinates, dose).
    patch_size: latent dimensions per token (see ``models/dit.py``)."""

    conditions: tuple[str, ...] = ("cell_type",)
    continuous: tuple[str, ...] = ()
    patch_size: int = 4
    hidden: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    cfg_dropout: float = 0.1


@dataclass(frozen=True)
class DiTRunConfig:
    run: RunSection = field(default_factory=lambda: RunSection(dir="runs/dit"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=256))
    split: SplitFileSection = field(default_factory=SplitFileSection)
    vae: VAERef = field(default_factory=VAERef)
    model: DiTModelSection = field(default_factory=DiTModelSection)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=8000, eval_every=1000, ema=True, ema_decay=0.999
        )
    )
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class DiTStage:
    name = "dit"

    def __init__(self, config: DiTRunConfig) -> None:
        check_split_section(config)
        self.config = config
        self._input = CountStoreInput(config.data.path, config.run.root_path)
        self._stats: dict | None = None
        self._card: dict | None = None
        self._count_meta = None
        self._samples: tuple[nn.Module, dict] | None = None  # (model, _check_samples of it)

    # -- paths --------------------------------------------------------------------------------

    @property
    def store(self) -> Path:
        return self._input.store

    @property
    def latents(self) -> Path:
        return self.config.run.dir_path / "latents"

    @property
    def val_latents(self) -> Path:
        """Latents of ``data.val_path``, when a separate validation store is given."""
        return self.config.run.dir_path / "val_latents"

    @property
    def split_path(self) -> Path:
        """The split's rows (``split.file`` only): rows of the count store and of its latents."""
        return self.config.run.dir_path / SPLIT_ROWS

    @property
    def stats_path(self) -> Path:
        return self.config.run.dir_path / "latent_stats.json"

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self._stats = read_run_json(self.stats_path)
        return self._stats

    # -- data ---------------------------------------------------------------------------------

    def prepare_data(self, is_main_process: bool) -> None:
        if not is_main_process:
            return
        if not self.config.vae.run:
            raise ConfigError(
                "vae.run is required: train a VAE first (latentcell train vae --set "
                "run.dir=RUNS/vae ...) and pass --set vae.run=RUNS/vae"
            )
        self._input.ensure_store()
        self.condition_columns(), self.continuous_columns()  # fail on a typo before encoding
        vae, provenance = load_vae(self.config.vae.run, self.config.vae.weights)
        if val_split.used(self.config):  # chosen (or refused) before anything is encoded
            record = val_split.prepare(self.store, self.config.data, self.stratify_columns(),
                                       self.config.run.dir_path, True)  # fmt: skip
            self._check_vae_val_split(record)
        self._ensure_latents(vae, provenance, self.store, self.latents)
        if self.config.split.file:
            split = assign_split(self.store, self.config.split.file)
            save_split(split, self.split_path.parent)
            self._check_vae_split(rows_digest(split.train))
        if self.config.data.val_path:
            val_store = Path(self.config.data.val_path)
            self._ensure_latents(vae, provenance, val_store, self.val_latents)
        stats = training_stats(
            self._sources()[0](),
            self.condition_columns(),
            self.continuous_columns(),
            self.count_meta.roles.get("batch") if self._vae_needs_batch() else None,
        )
        var = self.count_meta.var
        stats["genes"] = {
            "gene_key": [str(g) for g in var.index],
            "gene_id": [str(g) for g in var["gene_id"]],
            "gene_symbol": [str(g) for g in var["gene_symbol"]],
        }
        stats["latents"] = str(self.latents.absolute())
        stats["vae"] = LatentStoreReader(self.latents).provenance()["encoder"]
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(self.stats_path)
        self._stats = stats

    def _vae_card(self) -> dict:
        return self._vae_model_card().get("config", {})

    def _vae_model_card(self) -> dict:
        path = Path(self.config.vae.run) / "final" / "model_config.json"
        return load_model_card(self.config.vae.run) if path.exists() else {}

    def _check_vae_split(self, digest: str) -> None:
        """Warn when the VAE was not trained on this split's train rows: its latents of the
        test cells are then not held out (train it with the same split.file)."""
        vae_split = self._vae_model_card().get("split") or {}
        if vae_split.get("train_rows_sha256") != digest:
            print(
                f"warning: the VAE {self.config.vae.run} was not trained on the train rows of "
                f"{self.config.split.file} (it may have seen its val/test cells); train it with "
                f"--set split.file={self.config.split.file}",
                file=sys.stderr,
                flush=True,
            )

    def _check_vae_val_split(self, record: dict) -> None:
        """Warn when the VAE held out other cells of this store than the DiT validates on
        (another data.split_by / stratify / val_fraction / split_seed, or a condition that
        is not a role): its latents of the DiT's validation cells may be of training cells."""
        vae = self._vae_model_card().get("validation_split") or {}
        if not vae or vae.get("asked", {}).get("store") != record["asked"]["store"]:
            return
        if (vae["by"], vae["train_sha256"]) != (record["by"], record["train_sha256"]):

            def said(r: dict) -> str:
                a = r["asked"]
                return (f"by {r['by']}, val_fraction {a['val_fraction']}, split_seed "
                        f"{a['split_seed']}, stratified by {r['stratify']}")  # fmt: skip

            print(
                f"warning: the VAE {self.config.vae.run} held out other cells than this run's "
                f"validation split (VAE: {said(vae)}; DiT: {said(record)}): it may have "
                "trained on the DiT's validation cells; train the VAE with the same "
                "data.split_by, data.val_fraction, data.split_seed and "
                f"data.stratify={record['stratify']}",
                file=sys.stderr,
                flush=True,
            )

    def _vae_needs_batch(self) -> bool:
        return bool(self._vae_card().get("n_batches"))

    def _ensure_latents(self, vae, provenance: dict, source: Path, out: Path) -> None:
        """Encode ``source`` into the latent store ``out`` unless it already holds this
        store's latents under these VAE weights."""
        store = open_store(source)
        self._check_vocabulary(store.meta, source)
        fingerprint = source_fingerprint(source)
        if (out / "manifest.json").exists():
            old = LatentStoreReader(out).provenance()
            if old["source"]["manifest_sha256"] == fingerprint and old["encoder"] == provenance:
                return

        def obs_codes(part, key: str) -> torch.Tensor:
            """The codes the VAE knows as ``key`` (a role name or a column)."""
            return torch.from_numpy(part.codes[store.meta.roles.get(key) or key].astype(np.int64))

        c = vae.config

        @torch.no_grad()
        def encode(block) -> np.ndarray:
            out = []
            for a in range(0, block.n_cells, 4096):
                part = block.slice(a, min(a + 4096, block.n_cells))
                batch_index = covariates = None
                if c.encode_covariates:  # an encoder that also sees batch / covariates
                    batch_index = obs_codes(part, c.batch_key) if c.n_batches else None
                    covariates = {k: obs_codes(part, k) for k in c.covariate_keys} or None
                z = vae.encode(
                    csr_to_torch(part.X), torch.from_numpy(part.library_size), batch_index,
                    covariates,
                )[0]  # fmt: skip
                out.append(z.numpy())
            return np.concatenate(out)

        write_latent_store(store, encode, out, vae.config.n_latent, provenance, overwrite=True)

    def _check_vocabulary(self, meta, source: Path) -> None:
        n_genes = self._vae_card().get("n_genes")
        if n_genes != meta.n_genes:
            raise DataValidationError(
                source, "n_genes",
                f"the store has {meta.n_genes} genes, the VAE in {self.config.vae.run} "
                f"was trained on {n_genes}",
                "pass the store the VAE was trained on (data.path) or retrain the VAE",
            )  # fmt: skip
        vae_config = Path(self.config.vae.run) / "config.toml"
        vae_store = tomllib.loads(vae_config.read_text())["data"].get("path", "")
        if vae_store and Path(vae_store).exists():
            vae_genes = list(open_store(vae_store).meta.var.index)
            if vae_genes != list(meta.var.index):
                raise DataValidationError(
                    source, "var",
                    f"gene vocabulary differs from the VAE's store {vae_store}",
                    "build both stores with the same --genes vocabulary",
                )  # fmt: skip

    @property
    def count_meta(self):
        """The count store's metadata (the latent store copies its obs columns and roles)."""
        if self._count_meta is None:
            self._count_meta = open_store(self.store).meta
        return self._count_meta

    def _resolve(self, names, kind: str) -> tuple[str, ...]:
        meta = self.count_meta
        known = meta.categories if kind == "categorical" else meta.numeric_columns
        out = []
        for name in names:
            column = name if name in known else meta.roles.get(name)
            if column is None or column not in known:
                raise ConfigError(
                    f"model.{'conditions' if kind == 'categorical' else 'continuous'}: "
                    f"{name!r} is not a {kind} obs column (or role) of {self.store}; "
                    f"available: {sorted(c for c in known if not c.startswith('_'))}"
                )
            out.append(column)
        return tuple(out)

    def condition_columns(self) -> tuple[str, ...]:
        return self._resolve(self.config.model.conditions, "categorical")

    def continuous_columns(self) -> tuple[str, ...]:
        return self._resolve(self.config.model.continuous, "numeric")

    def stratify_columns(self) -> tuple[str, ...]:
        """The validation split's strata: ``data.stratify`` (default: the store's roles) and
        the conditions, so every condition label keeps training cells."""
        columns = resolve_columns(self.count_meta, self.config.data.stratify)
        return tuple(sorted({*columns, *self.condition_columns()}))

    def _sources(self):
        data = self.config.data
        if self.config.split.file:  # rows of the count store = rows of its latents
            return split_sources(self.latents, self.split_path)
        n_units = len(self.count_meta.unit_sizes)  # the latent store mirrors its units
        everything = subset_factory(self.latents, np.arange(n_units))
        if data.val_path:
            n_val_units = len(open_store(self.val_latents).meta.unit_sizes)
            return everything, subset_factory(self.val_latents, np.arange(n_val_units))
        if data.val_fraction <= 0:
            return everything, None
        # chosen on the count store (its group index); the latent store mirrors its rows
        run_dir = self.config.run.dir_path
        return val_split.sources(self.latents, self.store, data, self.stratify_columns(), run_dir)

    def _stream(self, source, rank: int, world_size: int, train: bool):
        data = self.config.data
        config = CellStreamConfig(
            batch_size=data.batch_size,
            seed=self.config.train.seed,
            shuffle=train,
            buffer_units=data.buffer_units,
            tail="pad",
            output="dense",
            columns=self.condition_columns(),
            numeric_columns=self.continuous_columns(),
            on_corrupt=data.on_corrupt,
        )
        return CellStream(source, config, rank=rank, world_size=world_size).loader()

    def train_loader(self, rank: int, world_size: int):
        return self._stream(self._sources()[0], rank, world_size, train=True)

    def val_loader(self, rank: int, world_size: int):
        source = self._sources()[1]
        return None if source is None else self._stream(source, rank, world_size, False)

    # -- checks -------------------------------------------------------------------------------

    def final_report(self, model: LatentDiffusion) -> dict[str, float]:
        """Memorization check of the trained DiT: ``latent_nn_ratio`` of sampled latents
        against the training latents (run defaults for steps and guidance, seed 0), per label
        of the first condition (the ``CHECK_LABELS`` most frequent), macro-averaged. About 1:
        new latents; well below 1: near-copies of training latents, which a long run on few
        cells drifts into while its held-out metrics can still improve. Only the latent
        shows it: the decoder's count noise hides copying. Label sizes come from the library
        statistics, and the store is read only until every pool is full. A label with more
        than ``CHECK_TRAIN`` cells is compared with its first ones in store order, which can
        only raise its ratio. Copying is a risk of small labels, which are compared whole."""
        from latentcell.evaluation.metrics import latent_nn_ratio

        pairs = self._check_samples(model).values()
        ratios = [latent_nn_ratio(train, z) for train, z in pairs]
        return {"memorization/latent_nn_ratio": float(np.mean(ratios))} if ratios else {}

    def final_figures(self, model: LatentDiffusion, run_dir: Path) -> list[Path]:
        """``generated_pca.png``: the latents the memorization check sampled against the
        training latents of their label, on PC1/PC2 of the training latents (no decoding:
        this is the space the DiT models, and the samples are already drawn)."""
        from .figures import plot_latent_pca

        samples, columns = self._check_samples(model), self.condition_columns()
        if not samples:
            return []
        names = self.count_meta.categories[columns[0]] if columns else None
        label = (lambda c: f"{columns[0]}={names[c]}") if columns else (lambda c: "all cells")
        real = {label(c): train for c, (train, _) in samples.items()}
        generated = {label(c): z for c, (_, z) in samples.items()}
        return [plot_latent_pca(real, generated, Path(run_dir) / "generated_pca.png")]

    @torch.no_grad()
    def _check_samples(self, model: LatentDiffusion) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per checked label: (its training latents, latents sampled for it), drawn once per
        model, so the check and the figure show the same cells."""
        if self._samples is not None and self._samples[0] is model:
            return self._samples[1]
        columns = self.condition_columns()
        sizes: dict[int, int] = {}  # training cells per label, from the library statistics
        for group in self.stats["library"]["groups"]:
            code = group["codes"][0] if columns else 0
            sizes[code] = sizes.get(code, 0) + group["n_cells"]
        labels = sorted(sizes, key=lambda c: -sizes[c])[:CHECK_LABELS]
        room = {c: min(sizes[c], CHECK_TRAIN) for c in labels}  # latents still wanted
        pools: dict[int, list[np.ndarray]] = {c: [] for c in labels}
        reader = self._sources()[0]()
        for unit in range(len(reader.meta.unit_sizes)):
            if not any(room.values()):  # every pool is full: read no further
                break
            block = reader.read_unit(unit)
            codes = block.codes[columns[0]] if columns else np.zeros(block.n_cells, np.int64)
            for code in labels:
                if room[code]:
                    rows = np.asarray(block.X[codes == code][: room[code]], dtype=np.float32)
                    pools[code].append(rows)
                    room[code] -= len(rows)
        generator = torch.Generator().manual_seed(0)
        out = {}
        for code in labels:
            train = np.concatenate(pools[code]) if pools[code] else np.zeros((0, 1))
            if len(train) < 2:
                continue
            codes, values = model.dit.null_condition(CHECK_SAMPLES, "cpu")
            if columns:
                codes[:, 0] = code
            out[code] = (train, model.sample(codes, values, generator=generator).numpy())
        self._samples = (model, out)
        return out

    # -- model --------------------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        if self._card is None:
            m, meta, stats = self.config.model, self.count_meta, self.stats
            categorical, continuous = self.condition_columns(), self.continuous_columns()
            config = LatentDiffusionConfig(
                dit=DiTConfig(
                    n_latent=len(stats["latent_shift"]),
                    patch_size=m.patch_size,
                    hidden=m.hidden,
                    depth=m.depth,
                    heads=m.heads,
                    mlp_ratio=m.mlp_ratio,
                    n_categories=tuple(len(meta.categories[c]) for c in categorical),
                    n_continuous=len(continuous),
                ),
                diffusion=self.config.diffusion,
                categorical_keys=categorical,
                continuous_keys=continuous,
                continuous_mean=tuple(stats["continuous"][c]["mean"] for c in continuous),
                continuous_std=tuple(stats["continuous"][c]["std"] for c in continuous),
                cfg_dropout=m.cfg_dropout,
            )
            self._card = {
                "class": MODEL_CLASS,
                "config": dataclasses.asdict(config),
                "categories": {c: meta.categories[c] for c in categorical},
                "roles": {r: c for r, c in meta.roles.items() if c},
                "vae": stats["vae"],
                "store": str(self.store.absolute()),
                "latents": stats["latents"],
            }
            if self.config.split.file:
                self._card["split"] = split_card(self.split_path)
            elif val_split.used(self.config):
                self._card["validation_split"] = val_split.read_record(self.config.run.dir_path)
        return self._card

    def build_model(self) -> nn.Module:
        return build_latent_diffusion(self.model_card(), self.stats)

    def serving_module(self, model: nn.Module) -> tuple[nn.Module, np.ndarray]:
        k, d = len(model.config.categorical_keys), model.config.dit.n_latent
        example = np.zeros((2, k + d + 1), dtype=np.float32)
        return DenoiserStep(model).eval(), example


class DenoiserStep(nn.Module):
    """One float array ``[codes (n, k) | x_t (n, d) | t (n, 1) in [0, 1]]`` -> the DiT's
    prediction (n, d) in the scaled latent space: the MLflow serving form. One network call,
    not a whole sampling loop: MLflow exports models with ``torch.export``, which would
    unroll every sampler step into the graph (a minute to export, and fixed steps)."""

    def __init__(self, model: LatentDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        k, d = len(self.model.config.categorical_keys), self.model.config.dit.n_latent
        codes = inputs[:, :k].round().long()
        _, values = self.model.dit.null_condition(inputs.shape[0], inputs.device)
        return self.model.dit(inputs[:, k : k + d], inputs[:, k + d], codes, values)
