"""Predict perturbed cells from control cells with a bundle's set model, on onnxruntime.

``OnnxSetPredictor`` is the ``Predictor`` of ``trainer/predict.py`` (log1p controls of one
cell type + a perturbation label -> predicted log1p cells), so ``predict_population`` writes
the same prediction file from it as from the torch ``STPredictor``. The controls are cut
into sets of the run's set size, as the torch predictor does, but run as ONE batch with the
last set padded and masked. Labels resolve as in torch: the label's own (trained) embedding,
or with ``unseen="generic"`` the learned generic perturbation plus the target effect on the
label's measured genes. Cell types too: the type's own row (and training-control mean), or
for a type without them, an error, or with ``unseen_cell_type="unknown"`` the learned
unknown cell type (and the set's own mean as basal).
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression import TARGET_SUM, log1p_normalize
from latentcell.models.perturbation_labels import (
    UNKNOWN_CELL_TYPE_FIX,
    UNSEEN_CELL_TYPE,
    UNTRAINED_CELL_TYPE_FIX,
    split_genes,
    target_columns,
    untrained_cell_type,
    untrained_parts,
)

from .bundle import Bundle
from .likelihoods import mean_log1p, sample_counts

__all__ = ["UNSEEN", "UNSEEN_CELL_TYPE", "OnnxSetPredictor"]

UNSEEN = ("error", "generic")


class OnnxSetPredictor:
    name = "st"

    def __init__(self, bundle: Bundle, unseen: str = "error", unseen_cell_type: str = "error"):
        if unseen not in UNSEEN:
            raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}")
        if unseen_cell_type not in UNSEEN_CELL_TYPE:
            raise ValueError(
                f"unseen_cell_type must be one of {UNSEEN_CELL_TYPE}, got {unseen_cell_type!r}"
            )
        p = bundle.metadata.get("prediction")
        if p is None or bundle.kind != "prediction":
            raise DataValidationError(
                bundle.path, "kind", f"a {bundle.kind} bundle does not predict perturbations",
                "export a fine-tuned ST run (latentcell train st)",
            )  # fmt: skip
        self.bundle, self.settings, self.unseen = bundle, p, unseen
        self.unseen_cell_type = unseen_cell_type
        self.model = bundle["set_model"]
        self.genes, self.gene_names = bundle.genes, bundle.gene_names
        self.labels = list(p["labels"])
        self.trained = p["trained"]
        # the cell types the model conditions on ([]: it ignores the controls' cell type)
        self.cell_types = list(p["cell_types"])
        conditioned = p.get("cell_type_conditioning", "cell_type" in self.model.input_names)
        self.trained_cell_types = p.get("trained_cell_types") if conditioned else None
        self.basal_cell_types = p.get("basal_cell_types")  # None: not basal="train" (or old)
        self.set_size = int(p["set_size"])
        self.latent = p["space"] == "latent"
        self.index = {g: i for i, g in enumerate(p["feature_genes"])}

    # -- labels -----------------------------------------------------------------------------------

    def untrained(self, label: str) -> list[str]:
        """What of ``label`` never had a trained embedding ([] when it is usable)."""
        p = self.settings
        return untrained_parts(
            label, self.trained, p["encoder"], p["combo_separator"], p["control_label"]
        )

    def _vocabulary_label(self, label: str) -> str:
        """``label`` itself, or for gene-sum encoders (gene_table, external), where ``B+A``
        embeds exactly as ``A+B``, the vocabulary label with the same genes."""
        p = self.settings
        if label in self.labels or p["encoder"] == "onehot":
            return label
        genes = set(split_genes(label, p["combo_separator"], p["control_label"]))
        same = [x for x in self.labels
                if set(split_genes(x, p["combo_separator"], p["control_label"])) == genes]  # fmt: skip
        return same[0] if same else label

    def _embedding(self, label: str) -> dict[str, np.ndarray]:
        """The set model's perturbation inputs for one set."""
        p = self.settings
        label = self._vocabulary_label(label)
        known = label in self.labels and not self.untrained(label)
        if not known and self.unseen != "generic":
            why = "not in the bundle's vocabulary" if label not in self.labels else (
                f"no training cell carried {self.untrained(label)}"
            )  # fmt: skip
            raise DataValidationError(
                self.bundle.path, f"perturbation {label!r}", why,
                "predict with --unseen generic (the learned generic perturbation, when the run "
                "used model.perturbation_dropout), or export with --add-perturbations for new "
                "combinations of trained genes",
            )  # fmt: skip
        if not known and "generic" not in self.model.input_names:
            raise DataValidationError(
                self.bundle.path, "--unseen", f"{label!r} has no trained embedding and this "
                "run learned no generic perturbation vector",
                "train with model.perturbation_dropout > 0 (e.g. 0.2) to use --unseen generic",
            )  # fmt: skip
        feeds = {"perturbation": np.asarray([self.labels.index(label) if known else 0], np.int64)}
        if "generic" in self.model.input_names:
            feeds["generic"] = np.asarray([not known])
        if "targets" in self.model.input_names:
            targets = np.zeros((1, len(self.index)), dtype=np.float32)
            targets[
                0, target_columns(label, self.index, p["combo_separator"], p["control_label"])
            ] = 1
            feeds["targets"] = targets
        return feeds

    def is_trained(self, label: str) -> bool:
        label = self._vocabulary_label(label)
        return label in self.labels and not self.untrained(label)

    # -- cell types ---------------------------------------------------------------------------

    def untrained_cell_type(self, cell_type: str) -> str:
        """Why the model has no trained parameters for ``cell_type`` ("" when it has them)."""
        return untrained_cell_type(
            cell_type, self.cell_types, self.trained_cell_types, self.basal_cell_types
        )

    def _cell_type(self, cell_type: str) -> dict[str, np.ndarray]:
        """The set model's cell-type inputs for one set ({} when it takes none)."""
        if "cell_type" not in self.model.input_names:
            return {}
        why = self.untrained_cell_type(cell_type)
        if why and self.unseen_cell_type != "unknown":
            raise DataValidationError(
                self.bundle.path, f"cell type {cell_type!r}", why, UNTRAINED_CELL_TYPE_FIX
            )
        if why and "unknown" not in self.model.input_names:
            raise DataValidationError(
                self.bundle.path, "--unseen-cell-type",
                f"{why}, and this run learned no unknown cell type", UNKNOWN_CELL_TYPE_FIX,
            )  # fmt: skip
        code = 0 if why else self.cell_types.index(cell_type)
        feeds = {"cell_type": np.asarray([code], dtype=np.int64)}
        if "unknown" in self.model.input_names:
            feeds["unknown"] = np.asarray([bool(why)])
        return feeds

    def routes(self, perturbation: str, cell_type: str) -> dict[str, str]:
        """The fallbacks a prediction takes (as ``STPredictor.routes``)."""
        out = {}
        if self._embedding(perturbation).get("generic", np.zeros(1, bool))[0]:
            out["perturbation"] = "generic"
        if self._cell_type(cell_type).get("unknown", np.zeros(1, bool))[0]:
            out["cell_type"] = "unknown"
        return out

    # -- the Predictor interface ----------------------------------------------------------------

    def predict(
        self,
        control: np.ndarray,
        perturbation: str,
        cell_type: str,
        library: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Predicted log1p expression (n, G) for log1p controls (n, G) of one cell type."""
        control = np.asarray(control, dtype=np.float32)
        if control.ndim != 2 or control.shape[1] != len(self.genes):
            raise DataValidationError(
                self.bundle.path, "controls", f"shape {control.shape}",
                f"pass (cells, {len(self.genes)}) log1p expression on the bundle's genes in order",
            )  # fmt: skip
        if "batch" in self.model.input_names:
            raise DataValidationError(
                self.bundle.path, "set_model.batch", "this set model is batch-conditioned, and "
                "control-set prediction has no batch per predicted cell",
                "train the ST model with model.batch_conditioning=false",
            )  # fmt: skip
        feeds = {**self._embedding(perturbation), **self._cell_type(cell_type)}
        x = self._encode(control) if self.latent else control
        n, s = len(x), self.set_size
        b = -(-n // s)
        sets = np.zeros((b * s, x.shape[1]), dtype=np.float32)
        sets[:n] = x
        mask = np.arange(b * s) < n
        feeds = {k: np.repeat(v, b, axis=0) for k, v in feeds.items()}
        out = self.model.run(control=sets.reshape(b, s, -1), mask=mask.reshape(b, s), **feeds)[
            "prediction"
        ].reshape(b * s, -1)[:n]
        return self._decode(out, library, rng) if self.latent else out

    # -- latent-space models ----------------------------------------------------------------------

    def _encode(self, log1p: np.ndarray) -> np.ndarray:
        counts = np.expm1(log1p).astype(np.float32)
        library = np.full(len(counts), TARGET_SUM, dtype=np.float32)
        return self.bundle["vae_encoder"].run(counts=counts, library_size=library)["mean"]

    def _decode(self, z, library, rng) -> np.ndarray:
        decoder = self.bundle["vae_decoder"]
        if library is None or rng is None:
            lib = np.full(len(z), TARGET_SUM, dtype=np.float32)
            return mean_log1p(decoder.run(latent=z, library_size=lib), lib)
        lib = np.asarray(library, dtype=np.float32)
        counts = sample_counts(decoder.run(latent=z, library_size=lib), lib, rng)
        return log1p_normalize(counts, lib)
