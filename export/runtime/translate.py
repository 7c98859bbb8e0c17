"""A "multiomics" bundle on onnxruntime: ``OnnxTranslator``, what the runtime's ``translate``
command runs. The bundle's section names the two graphs of each direction (an encoder, then
the other modality's decoder, at library 1 so its NB mean is the proportions); reading,
matching and writing the cells is ``inference/translation_files.py``'s, shared with
``latentcell predict --to``. No torch on this path.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.translation_files import TranslatorBase

__all__ = ["OnnxTranslator"]


class OnnxTranslator(TranslatorBase):
    def __init__(self, bundle) -> None:
        section = bundle.metadata.get("multiomics")
        if bundle.kind != "multiomics" or not isinstance(section, dict):
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle does not translate between "
                "modalities", "export a multiomics run (latentcell train multiomics)",
            )  # fmt: skip
        try:
            library = {"rna": float(section["rna_library"]),
                       "protein": float(section["protein_library"])}  # fmt: skip
            super().__init__(bundle.genes, section["proteins"], library, section["protein_key"],
                             str(bundle.path))  # fmt: skip
            self.graphs = {t: [bundle[name] for name in section["translate"][t]]
                           for t in ("protein", "rna")}  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise DataValidationError(bundle.path, "multiomics", f"invalid ({err})",
                                      "re-export the run") from err  # fmt: skip

    def proportions(self, counts: np.ndarray, source: str, target: str) -> np.ndarray:
        encoder, decoder = self.graphs[target]
        x = np.asarray(counts, np.float32)
        mean = encoder.run(counts=x, library_size=x.sum(1))["mean"]
        ones = np.ones(len(x), np.float32)
        return decoder.run(latent=mean, library_size=ones)["mu"]
