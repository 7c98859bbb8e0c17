"""A "masked-diffusion" bundle (conditional discrete diffusion over binned expression) on
onnxruntime: ``OnnxMaskedDiffusionPredictor``, the ``Predictor`` the runtime's ``predict
[--steps K --guidance W]`` uses. The sampler, labels and refusals are
``inference/masked_diffusion_sampling.py``'s numpy, shared with the torch predictor, so for
one seed both draw the same cells up to float error; here only the bundle's two graphs run
(``control_encoder`` once per control set, ``denoiser`` at every unmasking step). No torch on
this path. The HTTP service does not serve these bundles (it predicts with set models only);
use this command or the class.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.masked_diffusion_sampling import MaskedDiffusionPredictorBase
from latentcell.inference.run_inputs import refuse_fallbacks

__all__ = ["OnnxMaskedDiffusionPredictor", "masked_diffusion_predictor"]


class OnnxMaskedDiffusionPredictor(MaskedDiffusionPredictorBase):
    """A "masked-diffusion" bundle behind the ``Predictor`` interface (``steps`` /
    ``guidance``: the sampler's, None = the run's)."""

    def __init__(self, bundle, steps=None, guidance=None) -> None:
        settings = bundle.metadata.get("masked_diffusion")
        if bundle.kind != "masked-diffusion" or not isinstance(settings, dict):
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle is not a masked-diffusion model",
                "export a masked-diffusion run (latentcell train masked-diffusion)",
            )  # fmt: skip
        super().__init__(settings, bundle.genes, bundle.path, steps, guidance)
        self.encoder, self.denoiser = bundle["control_encoder"], bundle["denoiser"]
        self.gene_names = bundle.gene_names  # ids and symbols match the controls' genes

    def _encode_controls(self, control: np.ndarray) -> np.ndarray:
        return self.encoder.run(control=control.astype(np.float32, copy=False))["memory"]

    def _logits(self, tokens, control_bins, memory, codes) -> np.ndarray:
        return self.denoiser.run(tokens=tokens.astype(np.int64, copy=False),
                                 control_bins=control_bins.astype(np.int64, copy=False),
                                 memory=memory.astype(np.float32, copy=False),
                                 perturbation=codes.astype(np.int64, copy=False))["logits"]  # fmt: skip


def masked_diffusion_predictor(bundle, args) -> tuple[OnnxMaskedDiffusionPredictor, dict]:
    """The runtime ``predict`` command's predictor for a "masked-diffusion" bundle and its
    column defaults; ST's ``--unseen`` fallbacks do not exist here: refused."""
    refuse_fallbacks(bundle.path, args, "a masked-diffusion bundle",
                     "it learns no generic perturbation; any cell type's control set works")  # fmt: skip
    predictor = OnnxMaskedDiffusionPredictor(bundle, args.steps, args.guidance)
    s = predictor.settings
    columns = {"control_label": s["control_label"], "pert_col": s["columns"]["perturbation"],
               "cell_type_col": s["columns"]["cell_type"]}  # fmt: skip
    return predictor, columns
