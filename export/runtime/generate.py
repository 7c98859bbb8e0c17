"""Generate cells from a bundle: the ``latentcell generate`` pipeline on onnxruntime.

conditions -> codes/values (``models.conditions``, as in torch)
-> DDIM or the flow ODE over the ``denoiser`` with classifier-free guidance
-> unscaled latents -> library sizes and batches (``models.library_size``)
-> ``vae_decoder`` parameters -> counts sampled from the likelihood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.gene_names import GeneNames
from latentcell.models.conditions import ConditionRows, ConditionSpace
from latentcell.models.library_size import LibraryModel

from .bundle import Bundle
from .likelihoods import sample_counts
from .samplers import ddim, ddim_timesteps, flow, guided
from .split_denoiser import split_denoiser

__all__ = ["GeneratedCells", "OnnxGenerator"]


@dataclass
class GeneratedCells:
    """counts (n, G) float32 on ``genes``; latents (n, d) in the VAE's units; per-cell
    library sizes and decoder batch codes (labels ``batch_labels`` of obs column
    ``batch_column``, None for a batch-free decoder); the condition rows; the sampler
    settings (written to ``uns``)."""

    counts: np.ndarray
    latents: np.ndarray
    library: np.ndarray
    batch: np.ndarray
    rows: ConditionRows
    settings: dict
    genes: dict
    batch_column: str | None = None
    batch_labels: tuple[str, ...] = ()

    def to_anndata(self):
        """The same AnnData ``latentcell generate`` writes (anndata imported here only)."""
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp

        obs = self.rows.obs_frame()
        obs["library_size"] = self.library
        if self.batch_column:
            obs[self.batch_column] = pd.Categorical.from_codes(self.batch, self.batch_labels)
        var = GeneNames.from_table(self.genes).var_frame()  # gene_names.py's rule
        adata = ad.AnnData(X=sp.csr_matrix(self.counts), obs=obs, var=var)
        adata.obsm["X_latent"] = self.latents.astype(np.float32)
        adata.uns["latentcell"] = dict(self.settings)
        return adata


class OnnxGenerator:
    """``bundle``: a generation bundle (a DiT run's export). ``library``: "latent" (depths
    follow each generated latent, the default) or "condition", as ``latentcell generate``."""

    def __init__(self, bundle: Bundle, library: str = "latent") -> None:
        if "generation" not in bundle.metadata:
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle cannot generate cells",
                "export a latent-diffusion run (latentcell train dit) to generate",
            )  # fmt: skip
        self.bundle = bundle
        g = bundle.metadata["generation"]
        self.settings = g
        self.space = ConditionSpace.from_dict(g["conditions"], str(bundle.path))
        self.library = LibraryModel(g["library"], mode=library)
        self.shift = np.asarray(g["latent_shift"], dtype=np.float32)
        self.scale = np.float32(g["latent_scale"])
        self.diffusion = g["diffusion"]
        self.alphas = np.asarray(self.diffusion.get("alphas_cumprod", []), dtype=np.float64)
        self.n_latent = len(self.shift)
        self.denoiser = bundle["denoiser"]
        self.decoder = bundle["vae_decoder"]
        self.lib_columns = [list(self.space.categories).index(c) for c in self.library.columns]
        self.batch_aware = "batch" in self.decoder.input_names

    # -- the pieces -----------------------------------------------------------------------------

    def _conditions(self, rows: ConditionRows) -> tuple[dict, dict]:
        """(conditional, null) denoiser inputs for the rows."""
        n = len(rows)
        cond, null = {}, {}
        if "codes" in self.denoiser.input_names:
            cond["codes"] = rows.codes
            sizes = [len(v) for v in self.space.categories.values()]
            null["codes"] = np.tile(np.asarray(sizes, dtype=np.int64), (n, 1))
        if "values" in self.denoiser.input_names:
            cond["values"] = rows.values
            null["values"] = np.full_like(rows.values, np.nan)
        return cond, null

    def _denoise(self, x: np.ndarray, t: np.ndarray, condition: dict) -> np.ndarray:
        return self.denoiser.run(x=x, t=t, **condition)["prediction"]

    def sample_latents(
        self,
        rows: ConditionRows,
        steps: int | None = None,
        guidance: float | None = None,
        noise: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Latents (n, d) in the VAE's units; ``noise`` (n, d) fixes the starting point."""
        d = self.diffusion
        steps = int(d["sample_steps"] if steps is None else steps)
        guidance = float(d["guidance"] if guidance is None else guidance)
        rng = rng or np.random.default_rng(0)
        if noise is None:
            noise = rng.standard_normal((len(rows), self.n_latent)).astype(np.float32)
        cond, null = self._conditions(rows)
        split = split_denoiser(self.bundle, cond, null, guidance, len(rows))
        denoise = split or guided(self._denoise, cond, null, guidance)
        if split is not None and d["objective"] != "flow":
            n_train = len(self.alphas)
            split.prime(ddim_timesteps(n_train, steps).astype(np.float32) / np.float32(n_train))
        if d["objective"] == "flow":
            x = flow(denoise, noise, steps, d["solver"])
        else:
            x = ddim(denoise, noise, self.alphas, d["prediction"], steps, d["eta"], rng)
        return x / self.scale + self.shift

    def decoder_parameters(
        self, z: np.ndarray, library: np.ndarray, batch: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        feeds = {"latent": z.astype(np.float32), "library_size": library.astype(np.float32)}
        if self.batch_aware:
            feeds["batch"] = batch.astype(np.int64)
        return self.decoder.run(**feeds)

    def decode(self, z: np.ndarray, rows: ConditionRows, rng: np.random.Generator):
        """(counts, library sizes, batch codes) sampled for latents ``z``."""
        library, batch = self.library.sample(rows.codes[:, self.lib_columns], rng, z)
        batch = np.where(rows.batch >= 0, rows.batch, batch)
        params = self.decoder_parameters(z, library, batch)
        return sample_counts(params, library, rng, self.decoder.threads), library, batch

    # -- the whole pipeline ---------------------------------------------------------------------

    def generate(
        self,
        n: int,
        conditions: dict[str, str],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int = 4096,
    ) -> GeneratedCells:
        if n < 1:
            raise DataValidationError(self.bundle.path, "--n", f"got {n}", "pass --n >= 1")
        rows = self.space.rows(n, conditions)
        parts = []
        for start in range(0, len(rows), batch_size):
            part = rows.take(slice(start, start + batch_size))
            rng = np.random.default_rng([seed, start])
            z = self.sample_latents(part, steps, guidance, rng=rng)
            parts.append((z, *self.decode(z, part, rng)))
        z, counts, library, batch = (np.concatenate(p) for p in zip(*parts, strict=True))
        d = self.diffusion
        settings = {
            "source": "onnx",
            "bundle": str(self.bundle.path.absolute()),
            "run": self.bundle.metadata["source"]["run"],
            "objective": d["objective"],
            "steps": int(steps or d["sample_steps"]),
            "guidance": float(d["guidance"] if guidance is None else guidance),
            "seed": int(seed),
            "library": self.library.mode,
            "conditions": json.dumps(conditions),
        }
        genes = self.bundle.metadata["genes"]
        column = self.space.batch_column if self.batch_aware else None
        return GeneratedCells(
            counts, z, library, batch, rows, settings, genes, column, self.space.batch_labels
        )
