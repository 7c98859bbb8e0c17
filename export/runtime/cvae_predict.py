"""A "cvae" bundle (a conditional-VAE run, seed 003) on onnxruntime: ``OnnxCVAEPredictor``,
the ``Predictor`` the runtime's ``predict --mode b|a`` uses. Labels, codes and modes are
``inference/cvae_modes.py``'s, shared with the torch predictor; here only the bundle's
encoder and decoder run, and samples come from the runtime's numpy ``likelihoods``. No
torch on this path. The HTTP service does not serve cvae bundles (it predicts with set
models only); use this command or the class.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.cvae_modes import CVAEPredictorBase
from latentcell.inference.run_inputs import refuse_fallbacks
from latentcell.models.expression import TARGET_SUM

from .likelihoods import mean_log1p, sample_counts

__all__ = ["OnnxCVAEPredictor", "cvae_predictor"]


class OnnxCVAEPredictor(CVAEPredictorBase):
    """A "cvae" bundle's encoder and decoder on onnxruntime behind the ``Predictor``
    interface (``mode``: "b" default, or "a")."""

    def __init__(self, bundle, mode: str | None = None) -> None:
        settings = bundle.metadata.get("cvae")
        if bundle.kind != "cvae" or not isinstance(settings, dict):
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle is not a conditional VAE",
                "export a cvae run (latentcell train cvae), or drop --mode",
            )  # fmt: skip
        super().__init__(settings, bundle.genes, mode, bundle.path)
        self.encoder, self.decoder = bundle["vae_encoder"], bundle["vae_decoder"]
        self.gene_names = bundle.gene_names  # ids and symbols match the controls' genes

    def _encode(self, counts, library, codes) -> np.ndarray:
        return self.encoder.run(counts=counts, library_size=library, **codes)["mean"]

    def _decode_mean(self, z, codes) -> np.ndarray:
        library = np.full(len(z), TARGET_SUM, dtype=np.float32)
        return mean_log1p(self.decoder.run(latent=z, library_size=library, **codes), library)

    def _decode_sample(self, z, library, codes, rng) -> np.ndarray:
        params = self.decoder.run(latent=z, library_size=library, **codes)
        return sample_counts(params, library, rng)


def cvae_predictor(bundle, args) -> tuple[OnnxCVAEPredictor, dict]:
    """The runtime ``predict`` command's predictor for a "cvae" bundle (``args.mode``) and its
    column defaults (control_label, pert_col, cell_type_col). ST's ``--unseen`` fallbacks
    do not exist here (no generic perturbation or unknown cell type is learnt): refused."""
    refuse_fallbacks(bundle.path, args, "a cvae bundle",
                     "it learns no generic perturbation or unknown cell type")  # fmt: skip
    predictor = OnnxCVAEPredictor(bundle, args.mode)
    s = predictor.settings
    columns = {"control_label": s["control_label"], "pert_col": s["columns"]["perturbation"],
               "cell_type_col": s["columns"]["cell_type"]}  # fmt: skip
    return predictor, columns
