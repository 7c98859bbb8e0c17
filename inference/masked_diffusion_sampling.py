"""Sample perturbed cells from a masked-diffusion run, in numpy: what the torch predictor
(``masked_diffusion_predictor.py``) and the ONNX one (``export/runtime/
masked_diffusion_predict.py``) share. No torch, so the torch-free runtime imports it; the two
differ only in how they run the two networks (the control-set encoder and the denoiser), so
they refuse the same labels and, for one seed, draw the same cells up to float error.

For log1p controls (n, G) of one cell type and a perturbation p:

1. the controls are cut into sets of the run's ``set_size`` (a short last set is topped up
   with other controls, drawn from ``rng``, whose outputs are dropped), and each set is
   encoded once into its memory;
2. **confidence-ordered unmasking** in ``steps`` steps: every gene of every cell starts as
   MASK; at step k the denoiser gives each masked gene a bin distribution (guided: log p_null
   + w (log p_cond - log p_null), renormalized; w = 1 is the conditional model alone); the
   genes whose distributions are most confident (highest top probability) are unmasked, so
   that floor(G (1 - k / steps)) stay masked (none after the last step), each with a bin
   drawn from its distribution (Gumbel-max, from ``rng``).
   Why the position's confidence and not the confidence of its draw (MaskGIT's rule): which
   genes are unmasked then depends on the distributions only, never on the draws, so every
   kept bin is an unbiased draw from the model's conditional given the genes already fixed
   (for an exact model, any such order samples the joint). A trained model is not exact off
   the masks it was trained on: opening the confident genes first shows it patterns it never
   saw (the sparse genes' zeros fixed, the expressed genes still masked), and on Papalexi 2021
   its cells then came out with too many zeros (84% against the controls' 78.5%), where a
   random order (``model.sample_order=random``, the masks of training) gave 78%. Keeping
   the most probable DRAWS instead re-draws the unlikely ones until they are likely, which
   pulls every gene towards its mode and shrinks the population's spread (tested: with
   fixed per-gene distributions the drawn bins' frequencies are the distributions');
3. each bin is decoded by a uniform draw inside it (``expression_bins.values_from_bins``):
   log1p values, which ``predict.predict_population`` turns into counts at the controls'
   library sizes.

The settings are a dict built from the run's model card by ``masked_diffusion_settings``;
the exporter writes the same dict as the bundle's "masked_diffusion" section.
"""

from __future__ import annotations

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.expression_bins import bin_values, values_from_bins

from .run_inputs import TrainedLabels, checked_controls

__all__ = ["MaskedDiffusionPredictorBase", "masked_diffusion_settings", "unmask"]

SETS_PER_CALL = 8  # control sets per network call


def masked_diffusion_settings(card: dict) -> dict:
    """What sampling needs from a run's model card (the bundle's "masked_diffusion" section)."""
    config, cats, roles = card["config"], card["categories"], card.get("roles", {})
    return {
        "labels": list(cats["perturbation"]),
        "control_label": card["control_label"],
        "trained": list(card["trained_perturbations"]),
        "columns": {role: roles.get(role) for role in ("perturbation", "cell_type", "batch")},
        "n_bins": int(config["n_bins"]),
        "edges": [float(e) for e in card["bins"]["edges"]],
        "set_size": int(card["set_size"]),
        "null_code": len(config["perturbation_labels"]),
        "sample_steps": int(config["sample_steps"]),
        "guidance": float(config["guidance"]),
        "order": config.get("sample_order", "confidence"),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def unmask(log_probs, shape, n_bins: int, steps: int, rng: np.random.Generator,
           order: str = "confidence") -> np.ndarray:  # fmt: skip
    """Bins (shape = (..., G)) by iterative unmasking (module docstring, step 2);
    ``log_probs(tokens) -> (..., G, K)`` log-probabilities, MASK = ``n_bins``; ``order``
    "confidence" opens the most confident masked genes first, "random" a uniform subset."""
    tokens = np.full(shape, n_bins, dtype=np.int64)
    n_genes = shape[-1]
    steps = max(1, min(int(steps), n_genes))
    for k in range(steps):
        masked = tokens == n_bins
        logp = log_probs(tokens)
        gumbel = -np.log(-np.log(rng.random(logp.shape, dtype=np.float32).clip(1e-12, 1.0)))
        draw = np.argmax(logp + gumbel, axis=-1)
        score = logp.max(-1) if order == "confidence" else rng.random(masked.shape)
        confidence = np.where(masked, score, -np.inf)
        left = int(np.floor(n_genes * (1.0 - (k + 1) / steps)))
        n_open = int(masked[(0,) * (masked.ndim - 1)].sum()) - left  # equal in every cell
        if n_open <= 0:
            continue
        opened = np.argsort(-confidence, axis=-1, kind="stable")[..., :n_open]
        keep = np.zeros(shape, dtype=bool)
        np.put_along_axis(keep, opened, True, axis=-1)
        tokens = np.where(keep & masked, draw, tokens)
    return tokens


class MaskedDiffusionPredictorBase(TrainedLabels):
    """Labels and the sampling recipe; a subclass runs the networks:
    ``_encode_controls(control (B, S, G)) -> memory (B, S, H)`` and
    ``_logits(tokens (B, S, G), control_bins (B, S, G), memory, codes (B,)) -> (B, S, G, K)``."""

    carried_by = "training set"
    lacks = "the model has no trained embedding or magnitude for it"

    def __init__(self, settings: dict, genes, source, steps=None, guidance=None) -> None:
        if steps is not None and steps < 1:
            raise DataValidationError(source, "--steps", f"got {steps}", "pass 1 or more steps")
        if guidance is not None and not np.isfinite(guidance):
            raise DataValidationError(source, "--guidance", f"got {guidance}", "pass a number")
        self.settings, self.genes, self.source = settings, list(genes), source
        self.steps = int(settings["sample_steps"] if steps is None else steps)
        self.guidance = float(settings["guidance"] if guidance is None else guidance)
        self.edges = np.asarray(settings["edges"], dtype=np.float32)
        self.name = "masked-diffusion"
        self.labels = list(settings["labels"])
        self.cell_types: list[str] = []  # the control set carries the cell type

    def _encode_controls(self, control: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _logits(self, tokens, control_bins, memory, codes) -> np.ndarray:
        raise NotImplementedError

    def _sets(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(sets, set_size) control rows: 0..n-1 in order, the last set topped up with
        controls drawn from ``rng`` (slots past n: generated, then dropped)."""
        size = min(self.settings["set_size"], n)
        slots = np.arange(-(-n // size) * size)
        rows = np.where(slots < n, slots, 0)
        rows[slots >= n] = rng.integers(0, n, int((slots >= n).sum()))
        return rows.reshape(-1, size)

    def sample_bins(self, control_sets: np.ndarray, code: int, rng) -> np.ndarray:
        """Bins (B, S, G) of cells generated from control sets (B, S, G) under ``code``."""
        memory = self._encode_controls(control_sets)
        paired = bin_values(control_sets, self.edges)  # cell i reads control i
        b = len(control_sets)
        cond = np.full(b, code, np.int64)
        null = np.full(b, self.settings["null_code"], np.int64)
        w = self.guidance

        def log_probs(tokens: np.ndarray) -> np.ndarray:
            if w == 1.0:
                return _log_softmax(self._logits(tokens, paired, memory, cond))
            both = self._logits(*(np.concatenate([a, a]) for a in (tokens, paired, memory)),
                                np.concatenate([cond, null]))  # fmt: skip
            lc, ln = _log_softmax(both[:b]), _log_softmax(both[b:])
            return _log_softmax(ln + w * (lc - ln))

        order = self.settings.get("order", "confidence")
        return unmask(
            log_probs, control_sets.shape, self.settings["n_bins"], self.steps, rng, order
        )

    def predict(self, control, perturbation, cell_type, library=None, rng=None) -> np.ndarray:
        """Predicted log1p expression (n, G) for log1p controls (n, G) of one cell type: cell
        i is generated in the set that holds control i."""
        control = checked_controls(control, self.genes, self.source)
        code = self._label_code(perturbation)  # refuses before any work
        rng = np.random.default_rng(0) if rng is None else rng
        n = len(control)
        out = np.zeros_like(control)
        if n == 0:
            return out
        sets = self._sets(n, rng)
        size = sets.shape[1]
        for a in range(0, len(sets), SETS_PER_CALL):
            rows = sets[a : a + SETS_PER_CALL]
            bins = self.sample_bins(control[rows], code, rng)
            values = values_from_bins(bins, self.edges, rng).reshape(-1, control.shape[1])
            slots = np.arange(a * size, a * size + len(values))
            out[slots[slots < n]] = values[slots < n]
        return out
