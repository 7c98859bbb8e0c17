"""Translation with a finished multiomics run (torch): cells measured in one modality -> the
other. A cell is encoded by its measured modality's posterior mean and the other modality's
proportions are decoded (``MultiomicsVAE.translate``); what is read and written around that
is ``translation_files.TranslatorBase``'s, shared with the ONNX runtime.

    translator = load_translator(run_dir)
    translated = translator.translate_file(cells, "protein", "cells.h5ad")   # or "rna"
    scores_input = translator.normalized(rna_counts, "rna", "protein")       # log1p(p * 1e4)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.multiomics import MODEL_CLASS, MultiomicsConfig, MultiomicsVAE

from .translation_files import TARGETS, TranslatorBase

__all__ = ["TARGETS", "Translator", "load_translator"]

ROWS = 4096  # cells per forward pass (bounds the dense decoded matrix's memory)


def load_translator(run_dir: str | Path, weights: str = "auto") -> Translator:
    """The translator of a finished multiomics run (the family's ``translator``)."""
    from latentcell.inference.trained_runs import _DAMAGED_FIX, load_model_card, load_weights
    from latentcell.inference.trained_runs import weights_path as find_weights

    card = load_model_card(run_dir, MODEL_CLASS)
    try:
        model = MultiomicsVAE(MultiomicsConfig(**card["config"]))
        library = {"rna": float(card["rna_library"]), "protein": float(card["protein_library"])}
        translator = Translator(model.eval(), card["genes"], card["proteins"], library,
                                card.get("protein_key", "protein_counts"), run_dir)  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise DataValidationError(Path(run_dir) / "final" / "model_config.json", "config",
                                  f"invalid ({err})", _DAMAGED_FIX) from err  # fmt: skip
    load_weights(model, find_weights(run_dir, weights))
    return translator


class Translator(TranslatorBase):
    def __init__(self, model: MultiomicsVAE, genes, proteins, library, protein_key, run_dir):
        super().__init__(genes, proteins, library, protein_key, str(Path(run_dir).absolute()))
        self.model = model

    @torch.no_grad()
    def proportions(self, counts: np.ndarray, source: str, target: str) -> np.ndarray:
        out = []
        for start in range(0, len(counts), ROWS):
            x = torch.as_tensor(np.asarray(counts[start : start + ROWS], np.float32))
            out.append(self.model.translate(x, source, target).numpy())
        width = len(self.proteins if target == "protein" else self.genes)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)
