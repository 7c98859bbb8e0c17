"""Between log1p expression and a trained count VAE's latent space, for set models.

The VAE's encoder input is ``log1p(counts / library * 1e4)``, which is exactly the set models'
feature scale, so features go in as ``expm1(x)`` at library 1e4 (an exact round trip).
Decoding returns the decoder's mean expression on the same log1p scale; ``sample`` instead
draws counts from the VAE's likelihood at given library sizes and returns those cells on the
log1p scale, which is what a prediction file needs (the log1p of a mean is not the mean
log1p of cells, so decoded means would shift every gene's mean log expression). The latent-space ST
and the latent-arithmetic baseline (scGen) use both directions; a batch-aware decoder would
need a batch per predicted cell, which control-set prediction does not have, so such a VAE
is refused with the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError

from .trained_runs import load_vae

__all__ = ["VAEBridge"]

TARGET_SUM = 1e4


class VAEBridge:
    def __init__(self, run_dir: str | Path, weights: str = "auto") -> None:
        self.vae, self.provenance = load_vae(run_dir, weights)
        if self.vae.config.n_conditions:
            raise DataValidationError(
                run_dir, "model.batch_conditioning",
                "this VAE's decoder needs a batch per cell; set models predict without one",
                "train the VAE with --set model.batch_conditioning=false",
            )  # fmt: skip
        self.n_latent = self.vae.config.n_latent
        self.n_genes = self.vae.config.n_genes
        self.run_dir = Path(run_dir)

    def genes(self) -> list[str]:
        """The gene keys of the store the VAE was trained on, in its order."""
        import tomllib

        from latentcell.data_pipelines.stores import open_store

        config = tomllib.loads((self.run_dir / "config.toml").read_text())
        store = config["data"].get("path", "")
        if not store or not Path(store).exists():
            raise DataValidationError(
                self.run_dir, "config.toml data.path",
                f"the VAE's training store {store!r} is not available",
                "keep the VAE's store where it was trained (its genes define the latent)",
            )  # fmt: skip
        return [str(g) for g in open_store(store).meta.var.index]

    @torch.no_grad()
    def encode(self, log1p: torch.Tensor) -> torch.Tensor:
        """Posterior means (..., n_latent) of log1p features (..., n_genes)."""
        shape = log1p.shape
        flat = torch.expm1(log1p.reshape(-1, shape[-1]).float())
        library = torch.full((flat.shape[0],), TARGET_SUM)
        return self.vae.encode(flat, library)[0].reshape(*shape[:-1], self.n_latent)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean expression on the log1p scale, (..., n_genes)."""
        shape = z.shape
        params = self.vae.decode(z.reshape(-1, shape[-1]).float(), TARGET_SUM)
        mean = params["mean"] if "mean" in params else torch.log1p(params["scale"] * TARGET_SUM)
        return mean.reshape(*shape[:-1], self.n_genes)

    @torch.no_grad()
    def sample(self, z: np.ndarray, library: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cells (n, n_genes) on the log1p scale: counts drawn from the likelihood of latents
        ``z`` (n, n_latent) at ``library`` (n,), normalized like the features."""
        from .predict import log1p_normalize

        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        lib = torch.as_tensor(np.asarray(library, dtype=np.float32))
        counts = self.vae.sample(torch.as_tensor(np.asarray(z, dtype=np.float32)), lib, generator=g)
        return log1p_normalize(counts.numpy(), np.asarray(library))

    def check_genes(self, n_genes: int, store) -> VAEBridge:
        """Itself, if it was trained on ``n_genes`` genes (the store's), else one error line."""
        if self.n_genes != n_genes:
            raise DataValidationError(
                store, "n_genes", f"the store has {n_genes} genes, the VAE {self.n_genes}",
                "pass the VAE trained on this store's genes (vae.run)",
            )  # fmt: skip
        return self

    def encode_numpy(self, log1p: np.ndarray) -> np.ndarray:
        return self.encode(torch.from_numpy(np.asarray(log1p, dtype=np.float32))).numpy()

    def decode_numpy(self, z: np.ndarray) -> np.ndarray:
        return self.decode(torch.from_numpy(np.asarray(z, dtype=np.float32))).numpy()
