"""A "latent-delta" bundle (perturbation latent diffusion) on onnxruntime:
``OnnxLatentDeltaPredictor``, the ``Predictor`` the runtime's ``predict --mode
sampled|deterministic`` uses. The recipe, labels and noise are
``inference/latent_delta_modes.py``'s, shared with the torch predictor; here the bundle's
graphs run, the DDIM / flow sampler and guidance are the runtime's numpy ``samplers`` and
likelihood draws its numpy ``likelihoods``. No torch on this path. The HTTP service does not
serve these bundles (it predicts with set models only); use this command or the class.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.latent_delta_modes import LatentDeltaPredictorBase
from latentcell.inference.run_inputs import refuse_fallbacks
from latentcell.models.expression import TARGET_SUM

from .likelihoods import mean_log1p, sample_counts
from .samplers import ddim, flow, guided

__all__ = ["OnnxLatentDeltaPredictor", "latent_delta_predictor"]


class OnnxLatentDeltaPredictor(LatentDeltaPredictorBase):
    """A "latent-delta" bundle behind the ``Predictor`` interface (``mode``: "sampled"
    default, or "deterministic"; ``steps`` / ``guidance``: the sampler's, None = the run's)."""

    def __init__(self, bundle, mode=None, steps=None, guidance=None) -> None:
        s = bundle.metadata.get("latent_delta")
        if bundle.kind != "latent-delta" or not isinstance(s, dict):
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle is not a latent-delta model",
                "export a latent-delta run (latentcell train latent-delta)",
            )  # fmt: skip
        super().__init__(s, bundle.genes, mode, bundle.path, steps, guidance)
        self.bundle = bundle
        self.gene_names = bundle.gene_names
        self._mean = np.asarray(s["control_mean"], np.float32)
        self._std = np.asarray(s["control_std"], np.float32)
        self._shift = np.asarray(s["target_shift"], np.float32)
        self._scale = np.float32(s["target_scale"])

    def _encode(self, counts, library) -> np.ndarray:
        return self.bundle["vae_encoder"].run(counts=counts, library_size=library)["mean"]

    def _predict_mean(self, z_control, codes) -> np.ndarray:
        run = self.bundle["delta_predictor"].run
        return run(z_control=z_control.astype(np.float32), perturbation=codes)["delta"]

    def _sample(self, z_control, codes, noise, steps, guidance) -> np.ndarray:
        s = self.settings
        values = ((z_control - self._mean) / self._std).astype(np.float32)
        cond = {"codes": codes.reshape(-1, 1), "values": values}
        null = {"codes": np.full_like(cond["codes"], s["null_code"]), "values": values}
        denoiser = self.bundle["denoiser"]

        def denoise(x, t, condition):
            return denoiser.run(x=x, t=t, **condition)["prediction"]

        fn = guided(denoise, cond, null, guidance)
        d = s["diffusion"]
        if d["objective"] == "flow":
            x = flow(fn, noise, steps, d["solver"])
        else:
            alphas = np.asarray(d["alphas_cumprod"], np.float64)
            x = ddim(fn, noise, alphas, d["prediction"], steps, float(d["eta"]))
        return x / self._scale + self._shift

    def _decode_mean(self, z) -> np.ndarray:
        library = np.full(len(z), TARGET_SUM, dtype=np.float32)
        params = self.bundle["vae_decoder"].run(latent=z.astype(np.float32), library_size=library)
        return mean_log1p(params, library)

    def _decode_sample(self, z, library, rng) -> np.ndarray:
        params = self.bundle["vae_decoder"].run(latent=z.astype(np.float32), library_size=library)
        return sample_counts(params, library, rng)


def latent_delta_predictor(bundle, args) -> tuple[OnnxLatentDeltaPredictor, dict]:
    """The runtime ``predict`` command's predictor for a "latent-delta" bundle and its column
    defaults; ST's ``--unseen`` fallbacks do not exist here: refused."""
    refuse_fallbacks(bundle.path, args, "a latent-delta bundle",
                     "it learns no generic perturbation; any cell type's controls work")  # fmt: skip
    predictor = OnnxLatentDeltaPredictor(bundle, args.mode, args.steps, args.guidance)
    s = predictor.settings
    columns = {"control_label": s["control_label"], "pert_col": s["columns"]["perturbation"],
               "cell_type_col": s["columns"]["cell_type"]}  # fmt: skip
    return predictor, columns
