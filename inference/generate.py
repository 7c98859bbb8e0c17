"""Generate cells from a trained latent-diffusion run: DiT latents -> VAE decoder -> counts.

    sample latents (DDIM or the flow ODE, classifier-free guidance)
    -> decoder likelihood parameters (NB / ZINB / Gaussian) at a library size drawn from the
       per-condition log-normal of the training data, its mean linear in the generated
       latent (``library="latent"``, default) or not (``library="condition"``); batch drawn
       from its training mix when the VAE decoder is batch-aware and no batch was asked for
    -> counts sampled from that likelihood -> AnnData with the store's genes (var_names: the
       gene keys, with gene_id and gene_symbol; ``gene_names.py``), obs = conditions,
       ``obsm["X_latent"]`` = each cell's latent (for the latent memorization check);
       ``generate_seeds`` repeats that for several seeds, ``obs["sampling_seed"]`` saying which.

The same path with ``source="vae_prior"`` decodes z ~ N(0, I) instead: the baseline that
shows what the DiT adds over the VAE alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from latentcell.data_pipelines.atomic import write_h5ad_atomic
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.conditions import ConditionRows, ConditionSpace
from latentcell.models.count_vae import CountVAE
from latentcell.models.latent_diffusion import LatentDiffusion
from latentcell.models.library_size import LibraryModel

from .gene_names import GeneNames
from .model_builders import LATENT_DIFFUSION_CLASS as MODEL_CLASS
from .model_builders import build_latent_diffusion
from .trained_runs import load_model_card, load_vae, load_weights, read_run_json, weights_path

__all__ = ["CellGenerator", "condition_space", "write_h5ad_atomic"]

SOURCES = ("dit", "vae_prior")
SEED_COL = "sampling_seed"  # read by latentcell.evaluation.seeds


class CellGenerator:
    def __init__(
        self,
        run_dir: Path,
        dit: LatentDiffusion,
        card: dict,
        stats: dict,
        vae: CountVAE,
        library: str = "latent",
    ):
        self.run_dir, self.dit, self.card, self.stats, self.vae = run_dir, dit, card, stats, vae
        self.categorical = list(dit.config.categorical_keys)
        self.library = LibraryModel(stats["library"], mode=library)
        self.batch_column = stats["library"]["batch_column"]
        self.space = condition_space(run_dir, card, stats)
        self.var = GeneNames.from_table(stats["genes"]).var_frame()  # gene_names.py's rule

    @classmethod
    def load(
        cls, run_dir: str | Path, weights: str = "auto", library: str = "latent"
    ) -> CellGenerator:
        run_dir = Path(run_dir)
        card = load_model_card(run_dir, MODEL_CLASS)
        stats = read_run_json(run_dir / "latent_stats.json")
        dit = build_latent_diffusion(card, stats)
        load_weights(dit, weights_path(run_dir, weights))
        which = {"ema.safetensors": "ema", "model.safetensors": "model"}[card["vae"]["weights"]]
        vae, provenance = load_vae(card["vae"]["vae_run"], which)
        if provenance["weights_sha256"] != card["vae"]["weights_sha256"]:
            raise DataValidationError(
                card["vae"]["vae_run"], "final weights",
                "the VAE's weights changed since this DiT was trained on its latents",
                "retrain the DiT (latentcell train dit) on the current VAE",
            )  # fmt: skip
        return cls(run_dir, dit.eval(), card, stats, vae, library)

    # -- conditions ---------------------------------------------------------------------------

    def condition_rows(self, n: int, conditions: dict[str, str]) -> ConditionRows:
        """``n`` cells for each combination the conditions describe (``k=*``: every label)."""
        return self.space.rows(n, conditions)

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, rows: ConditionRows, steps=None, guidance=None, seed=0, source="dit"):
        g = torch.Generator().manual_seed(seed)
        n, d = len(rows.codes), self.dit.config.dit.n_latent
        if source == "vae_prior":
            return torch.randn((n, d), generator=g)
        return self.dit.sample(
            torch.from_numpy(rows.codes), torch.from_numpy(rows.values), steps, guidance,
            generator=g,
        )  # fmt: skip

    @torch.no_grad()
    def decode(self, z: torch.Tensor, rows: ConditionRows, seed: int = 0):
        """(counts CSR, library sizes, decoder batch codes) sampled for latents ``z``."""
        rng = np.random.default_rng([seed, 1])
        lib_codes = rows.codes[:, [self.categorical.index(c) for c in self.library.columns]]
        library, batch = self.library.sample(lib_codes, rng, z.numpy())
        batch = np.where(rows.batch >= 0, rows.batch, batch)
        batch_index = torch.from_numpy(batch) if self.vae.config.n_batches else None
        g = torch.Generator().manual_seed(seed + 1)
        counts = self.vae.sample(z, torch.from_numpy(library), batch_index, generator=g)
        return sp.csr_matrix(counts.numpy().astype(np.float32)), library, batch

    def generate(
        self,
        n: int,
        conditions: dict[str, str],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        source: str = "dit",
        batch_size: int = 4096,
    ) -> ad.AnnData:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if n < 1:
            raise DataValidationError(self.run_dir, "--n", f"got {n}", "pass --n >= 1")
        rows = self.condition_rows(n, conditions)
        parts, libs, batches, latents = [], [], [], []
        for a in range(0, len(rows.codes), batch_size):
            sl = slice(a, a + batch_size)
            part = rows.take(sl)
            z = self.sample_latents(part, steps, guidance, seed + a, source)
            X, lib, batch = self.decode(z, part, seed + a)
            parts.append(X)
            latents.append(z.numpy())
            libs.append(lib)
            batches.append(batch)
        obs = rows.obs_frame()
        obs["library_size"] = np.concatenate(libs)
        if self.batch_column and self.vae.config.n_batches:
            labels = self.stats["library"]["batch_labels"]
            obs[self.batch_column] = pd.Categorical.from_codes(np.concatenate(batches), labels)
        d = self.dit.config.diffusion
        adata = ad.AnnData(X=sp.vstack(parts, format="csr"), obs=obs, var=self.var.copy())
        adata.obsm["X_latent"] = np.concatenate(latents).astype(np.float32)
        adata.uns["latentcell"] = {
            "source": source,
            "run": str(self.run_dir.absolute()),
            "vae_run": self.card["vae"]["vae_run"],
            "objective": d.objective,
            "steps": int(steps or d.sample_steps),
            "guidance": float(d.guidance if guidance is None else guidance),
            "seed": int(seed),
            "library": self.library.mode,
            "conditions": json.dumps(conditions),
        }
        return adata

    def generate_seeds(self, n: int, conditions: dict[str, str], seeds: list[int], **kwargs):
        """``n`` cells per condition combination for EACH seed, in one AnnData (seed order),
        ``obs['sampling_seed']`` naming each cell's seed; one seed's numbers move with the
        sampling noise, several show by how much. ``uns['latentcell']['seed']`` is the first."""
        parts = [self.generate(n, conditions, seed=s, **kwargs) for s in seeds]
        for part, seed in zip(parts, seeds, strict=True):
            part.obs[SEED_COL] = np.full(part.n_obs, seed, dtype=np.int64)
        adata = parts[0]
        if len(parts) > 1:
            keys = [str(s) for s in seeds]
            adata = ad.concat(parts, keys=keys, index_unique="-seed", merge="same")
        adata.uns["latentcell"] = {**parts[0].uns["latentcell"], "seeds": [int(s) for s in seeds]}
        return adata


def condition_space(run_dir: str | Path, card: dict, stats: dict) -> ConditionSpace:
    """What a latent-diffusion run conditions on, from its model card and latent stats."""
    config = card["config"]
    continuous = tuple(config["continuous_keys"])
    return ConditionSpace(
        source=str(run_dir),
        categories={c: list(card["categories"][c]) for c in config["categorical_keys"]},
        continuous=continuous,
        continuous_mean=tuple(config["continuous_mean"]),
        continuous_std=tuple(config["continuous_std"]),
        roles=dict(card.get("roles", {})),
        batch_column=stats["library"]["batch_column"],
        batch_labels=tuple(stats["library"]["batch_labels"]),
    )
