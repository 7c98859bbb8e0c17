"""``latentcell export``: a finished run -> a bundle of ONNX files and their metadata.

What a run exports is decided by its family (``families.registry``: the family whose runs
write the model card's class names its ``exporter``):

- a count VAE run: ``vae_encoder`` and ``vae_decoder``;
- a latent-diffusion (DiT) run: its ``denoiser`` plus the encoder and decoder of the VAE it
  was trained on (generation decodes through it), and the generation settings: condition
  vocabularies, the noise schedule or flow settings, the latent scale, the library-size model;
- an ST run: its ``set_model`` (plus the VAE's encoder and decoder for ``space="latent"``) and
  the prediction settings: the perturbation vocabulary and which labels were trained;
- an ST pretraining run: its ``set_model`` (a masked-set imputer, kind "pretraining").

A later model type exports the same way: a graph in ``graphs.py`` and a function here that
returns the components and the metadata sections. Every file is exported, checked, reloaded
in onnxruntime and compared with torch on random inputs before the bundle is published (one
rename of a temporary directory), so a bundle on disk is always whole and verified.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

from latentcell.data_pipelines.atomic import AtomicDir, sha256_file, write_json_atomic
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.families import FAMILIES, family_of_card
from latentcell.inference.gene_names import GeneNames
from latentcell.inference.trained_runs import (
    load_model_card,
    load_vae,
    read_run_json,
    weights_path,
)
from latentcell.models.count_vae import TARGET_SUM, CountVAE

from .graphs import (
    ConditionerGraph,
    DenoiserBodyGraph,
    DenoiserGraph,
    ExportGraph,
    SetModelGraph,
    SharedDenoiserBodyGraph,
    VAEDecoderGraph,
    VAEEncoderGraph,
)
from .onnx_io import DEFAULT_OPSET, TOLERANCE, export_graph, parity
from .runtime.bundle import FORMAT, FORMAT_VERSION, METADATA, component_props

__all__ = ["ExportPlan", "export_run", "plan_dit", "plan_st", "plan_vae", "run_tracking"]


@dataclasses.dataclass
class ExportPlan:
    """kind: "autoencoder" | "generation" | "prediction" | "pretraining"; components: name ->
    graph; sections: metadata sections beside the common ones (genes, vae, generation, ...)."""

    kind: str
    components: dict[str, ExportGraph]
    sections: dict
    weights: Path


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def run_tracking(run_dir: Path) -> dict:
    """The run's MLflow run id and tracking URI (None when the run was not tracked): from
    its summary.json, or for runs written before summaries recorded them, from the last
    checkpoint's trainer state and the run config's tracking URI."""
    import tomllib

    from latentcell.trainer.tracking import default_uri

    summary = run_dir / "summary.json"
    mlflow = _object(read_run_json(summary)).get("mlflow") if summary.exists() else None
    if isinstance(mlflow, dict):
        return {"mlflow_run_id": _text(mlflow.get("run_id")),
                "tracking_uri": _text(mlflow.get("tracking_uri"))}  # fmt: skip
    states = sorted(run_dir.glob("checkpoints/step_*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.removeprefix("step_")))  # fmt: skip
    run_id = _text(_object(read_run_json(states[-1])).get("mlflow_run_id")) if states else None
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text())
        root = config["run"].get("root") or run_dir.resolve().parent
        uri = config.get("tracking", {}).get("uri") or default_uri(Path(root))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise DataValidationError(
            run_dir / "config.toml", "run", f"unreadable ({err})", "restore the run's config.toml"
        ) from err
    return {"mlflow_run_id": run_id, "tracking_uri": uri if run_id else None}


def _store_meta(store: str):
    """The run's training store's metadata (its genes go into the bundle)."""
    from latentcell.data_pipelines.stores import open_store

    if not store or not Path(store).exists():
        raise DataValidationError(
            store or "<none>", "genes", "the run's training store is not available, and its "
            "gene vocabulary is needed in the bundle", "keep the run's store where it was trained",
        )  # fmt: skip
    return open_store(store).meta


def _store_genes(meta, keys: Sequence[str] | None = None) -> dict[str, list[str]]:
    """gene_key / gene_id / gene_symbol of a store, in order (``keys`` checks the order)."""
    var = meta.var
    genes = {
        "gene_key": [str(g) for g in var.index],
        "gene_id": [str(g) for g in var["gene_id"]],
        "gene_symbol": [str(g) for g in var["gene_symbol"]],
    }
    if keys is not None and list(keys) != genes["gene_key"]:
        raise DataValidationError(
            meta.path, "genes", "the store's genes differ from the run's", "restore the run's store"
        )
    return genes


def run_genes(card: dict) -> dict[str, list[str]]:
    """A run's genes for its bundle: its training store's keys, ids and symbols while the
    store is there, else the card's keys and symbols (a key that looks like an Ensembl id is
    the id; "" where unknown, as ``inference/gene_names.py`` reads them)."""
    store = card.get("store", "")
    if store and Path(store).exists():
        return _store_genes(_store_meta(store), card["genes"])
    return GeneNames.from_card(card["genes"], card.get("gene_symbols")).to_dict()


def _vae_section(vae: CountVAE, provenance: dict, batch_column, batch_labels) -> dict:
    c = vae.config
    return {
        "likelihood": c.likelihood,
        "n_latent": c.n_latent,
        "n_genes": c.n_genes,
        "encode_covariates": c.encode_covariates,
        "batch_column": batch_column if c.n_batches else None,
        "batch_labels": list(batch_labels) if c.n_batches else [],
        **provenance,
    }


def _vae_components(vae: CountVAE) -> dict[str, ExportGraph]:
    return {"vae_encoder": VAEEncoderGraph(vae), "vae_decoder": VAEDecoderGraph(vae)}


def plan_vae(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    import tomllib

    vae, provenance = load_vae(run_dir, weights)
    meta = _store_meta(tomllib.loads((run_dir / "config.toml").read_text())["data"].get("path", ""))
    column = meta.roles.get("batch")
    labels = meta.categories[column] if column else []
    sections = {"genes": _store_genes(meta), "vae": _vae_section(vae, provenance, column, labels)}
    return ExportPlan("autoencoder", _vae_components(vae), sections, weights_path(run_dir, weights))


def plan_dit(run_dir: Path, card: dict, weights: str, **_) -> ExportPlan:
    from latentcell.inference.generate import CellGenerator

    gen = CellGenerator.load(run_dir, weights)
    model, stats = gen.dit, gen.stats
    d = model.config.diffusion
    diffusion = dataclasses.asdict(d)
    if d.objective == "ddpm":
        diffusion["alphas_cumprod"] = [float(a) for a in model.process.alphas_cumprod]
    library = stats["library"]
    sections = {
        "genes": {k: list(stats["genes"][k]) for k in ("gene_key", "gene_id", "gene_symbol")},
        "vae": _vae_section(gen.vae, card["vae"], library["batch_column"], library["batch_labels"]),
        "generation": {
            "conditions": gen.space.to_dict(),
            "latent_shift": [float(x) for x in model.latent_shift],
            "latent_scale": float(model.latent_scale),
            "diffusion": diffusion,
            "library": library,
        },
    }
    components = {
        "denoiser": DenoiserGraph(model.dit),
        # the same network split where the condition enters: the runtime computes the
        # conditioning once per distinct (t, condition) of a step (``OnnxGenerator``)
        "conditioner": ConditionerGraph(model.dit),
        "denoiser_body": DenoiserBodyGraph(model.dit),
        "denoiser_shared": SharedDenoiserBodyGraph(model.dit),
        **_vae_components(gen.vae),
    }
    return ExportPlan("generation", components, sections, weights_path(run_dir, weights))


def plan_st(run_dir: Path, card: dict, weights: str, add_perturbations=(), **_) -> ExportPlan:
    from latentcell.inference.model_builders import build_st_model
    from latentcell.inference.trained_runs import load_weights
    from latentcell.inference.vae_bridge import VAEBridge

    path = weights_path(run_dir, weights)
    model = build_st_model(card).eval()  # STPretrainModel adds no parameter to STModel
    load_weights(model, path)
    if add_perturbations:
        model.extend(list(add_perturbations))  # new combinations of trained genes
    vae = card.get("vae")
    bridge = None
    if model.config.space == "latent":
        bridge = VAEBridge(vae["vae_run"], "ema" if "ema" in vae["weights"] else "model")
    c = model.config
    pretraining = card["class"].endswith("STPretrainModel")
    genes = run_genes(card)
    roles = card.get("roles", {})
    cell_types = list(card["categories"].get("cell_type", []))
    sections = {
        "genes": genes,
        "prediction": {
            "space": c.space,
            "encoder": c.perturbation.kind,
            "labels": list(model.perturbation.labels),
            "trained": card.get("trained_perturbations"),
            "control_label": c.perturbation.control_label,
            "combo_separator": c.perturbation.combo_separator,
            "feature_genes": list(c.feature_genes),
            "cell_types": cell_types if model.uses_cell_type else [],
            "cell_type_conditioning": c.n_cell_types > 0,
            "trained_cell_types": card.get("trained_cell_types"),
            "basal_cell_types": _basal_cell_types(model, cell_types),
            "unknown_cell_type": c.cell_type_dropout > 0,
            "set_size": int(card.get("set_size", 128)),
            "pert_col": roles.get("perturbation"),
            "cell_type_col": roles.get("cell_type"),
            "basal": c.basal,
            "target_effect": c.target_effect,
            "generic": c.perturbation_dropout > 0,
        },
    }
    components: dict[str, ExportGraph] = {"set_model": SetModelGraph(model)}
    if bridge is not None:
        components.update(_vae_components(bridge.vae))
        sections["vae"] = _vae_section(bridge.vae, bridge.provenance, None, [])
    kind = "pretraining" if pretraining else "prediction"
    return ExportPlan(kind, components, sections, path)


def _basal_cell_types(model, cell_types: list[str]) -> list[str] | None:
    """The cell types with a training-control mean (``basal="train"`` per type; else None):
    the runtime refuses the others unless asked for the unknown cell type."""
    c = model.config
    if c.basal != "train" or not c.basal_cell_types:
        return None
    has_mean = (~model.control_mean.isnan().any(1)).tolist()
    return [t for t, ok in zip(cell_types, has_mean, strict=True) if ok]


def _versions(opset: int) -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"latentcell": version("latentcell"), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "opset": opset}  # fmt: skip


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    weights: str = "auto",
    add_perturbations: Sequence[str] = (),
    overwrite: bool = False,
) -> dict:
    """Export every trained component of ``run_dir`` into the bundle ``out``; returns the
    bundle's metadata. Nothing is written at ``out`` unless every component exported and
    matched torch within ``TOLERANCE``."""
    run_dir = Path(run_dir)
    card = load_model_card(run_dir)
    family = family_of_card(card, run_dir / "final" / "model_config.json")
    if family.exporter is None:
        exporting = sorted(name for name, f in FAMILIES.items() if f.exporter)
        raise DataValidationError(
            run_dir, "class", f"the {family.name} family has no ONNX export",
            f"export a run of one of {exporting}, or predict with `latentcell predict --run`",
        )  # fmt: skip
    exporter = family.load("exporter")
    plan = exporter(run_dir, card, weights, add_perturbations=tuple(add_perturbations))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": plan.kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(opset),
        "source": {
            "run": str(run_dir.absolute()),
            "class": card["class"],
            "weights": plan.weights.name,
            "weights_sha256": sha256_file(plan.weights),
            **run_tracking(run_dir),
        },  # fmt: skip
        "normalization": {
            "features": "log1p(counts / library_size * target_sum)",
            "target_sum": TARGET_SUM,
            "library_size": "sum of the cell's counts",
        },  # fmt: skip
        **plan.sections,
    }
    components, files = {}, {}
    with AtomicDir(out, overwrite=overwrite) as build:
        for name, graph in plan.components.items():
            path = build.tmp / f"{name}.onnx"
            export_graph(graph, path, component_props(metadata, name), opset)
            measured = parity(graph, path, graph.parity_sizes)
            if measured.max_rel_error > TOLERANCE:
                raise DataValidationError(
                    run_dir, name, f"onnxruntime differs from torch by {measured.max_rel_error:.2e}"
                    f" (relative), above {TOLERANCE:g}", "report this export as a bug",
                )  # fmt: skip
            components[name] = {"file": path.name, **graph.describe(), "parity": measured.to_dict()}
            files[path.name] = sha256_file(path)
        metadata["components"] = components
        metadata["files"] = files
        write_json_atomic(build.tmp / METADATA, metadata)
        build.commit()
    return metadata
