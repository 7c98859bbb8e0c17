"""Set-level self-supervised pretraining of the ST model on observational cells.

Objective (masked set reconstruction): a set of S cells of one group (one cell type of one
sample, ``data_pipelines.group_sets``) is turned into log1p-normalized expression
(``st_model.cell_features``); a random ``mask_fraction`` of the genes of every cell is set
to 0; the corrupted set goes in as the ST model's "control" set with the control
perturbation (the vocabulary is just ``(control_label,)``), and the model predicts the clean
set. Loss per set:

    mse_weight     * mean over masked entries of (pred - clean)^2
    + visible_weight * mean over visible entries of (pred - clean)^2
    + energy_weight  * energy_distance(pred set, clean set)

The masked MSE asks each cell to fill in its hidden genes from its visible genes and from
the other cells of the set (attention across the set); the small energy term asks the
predicted population to match the clean one as a whole, which is what the fine-tuned model
is judged on. Because the ST model predicts ``relu(input + delta)`` from a zero-initialized
head, the untrained model returns the corrupted input, whose masked MSE
(``masked_mse_input``, logged beside ``masked_mse``) is the baseline to beat.

Why the visible term (on by default, weight 1: the "emphasized" denoising loss, where each
masked entry weighs about (1 - f) / f times a visible one): a masked gene reads 0, like an
unexpressed one, and the head's delta is low-rank (``hidden`` wide), so the model cannot
fill in only the masked genes. With the masked MSE alone nothing holds the visible genes,
and the cheapest fit pulls every cell towards its set's mean: on synthetic scBaseCount
data (200 genes, hidden 32, 300 steps) a clean set went in and came out with an error of
0.57 per entry against a within-set variance of 0.64, which would hand fine-tuning a model
that erases the control cells' differences. With the visible term that error was 0.24 and
the masked MSE still 56% below the corrupted input's. At hidden 128, depth 2, S = 32 and
800 steps the two objectives reached the same masked MSE (0.84 and 0.83) while the
clean-set error was 0.29 with the visible term and 0.76 without. ``visible_weight=0``
restores the masked-only objective.

``STPretrainModel`` is a subclass of ``STModel`` that adds no parameter, so its state-dict
names are STModel's: ``latentcell train st --set init.run=PRETRAIN_RUN`` loads the cell
encoder, segment embeddings, blocks, norm and head (``trainer/init_from_run.py``: by name,
gene axes mapped by key), and the one-label perturbation table's row becomes the fine-tuned
model's control vector; see the stage (``trainer/st_pretrain_stage.py``) for the covariate
tables.

Masks: training masks come from torch's global RNG (seeded per process by the loop and
restored on resume). In eval mode each set's mask is drawn from its own generator seeded by
(``eval_seed``, set id), so validation scores the same corruption at every evaluation and
does not depend on how sets are batched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .set_losses import energy_distance
from .st_model import SetLossOutput, STConfig, STModel, cell_features

__all__ = ["MaskedSetObjective", "STPretrainModel", "STPretrainOutput"]


@dataclass(frozen=True)
class MaskedSetObjective:
    """mask_fraction: share of each cell's genes set to 0 (Bernoulli per entry).
    mse_weight / visible_weight / energy_weight: weights of the MSE on masked entries, the
    MSE on visible entries and the set energy distance (see the module docstring).
    eval_seed: seeds the per-set masks used in eval mode."""

    mask_fraction: float = 0.15
    mse_weight: float = 1.0
    energy_weight: float = 0.1
    visible_weight: float = 1.0
    eval_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1), got {self.mask_fraction}")
        for name in ("mse_weight", "energy_weight", "visible_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.mse_weight <= 0.0:
            raise ValueError(
                f"mse_weight must be > 0 (the masked objective), got {self.mse_weight}"
            )
        if self.eval_seed < 0:
            raise ValueError(f"eval_seed must be >= 0, got {self.eval_seed}")


@dataclass
class STPretrainOutput(SetLossOutput):
    masked_mse: torch.Tensor
    masked_mse_input: torch.Tensor
    visible_mse: torch.Tensor
    energy: torch.Tensor


class STPretrainModel(STModel):
    """An ``STModel`` trained by masked set reconstruction (see the module docstring)."""

    def __init__(self, config: STConfig, objective: MaskedSetObjective | None = None) -> None:
        if config.space != "gene":
            raise ValueError("masked set pretraining masks genes: it needs space='gene'")
        if config.perturbation.kind != "onehot" or config.perturbation_labels != (
            config.perturbation.control_label,
        ):
            raise ValueError(
                "pretraining has one perturbation, the control: use a onehot encoder over "
                f"perturbation_labels=({config.perturbation.control_label!r},)"
            )
        super().__init__(config)
        self.objective = objective or MaskedSetObjective()

    def gene_mask(self, shape: torch.Size, device: torch.device, set_id=None) -> torch.Tensor:
        """Boolean (B, S, G), True = masked. Eval mode with set ids: one seeded draw per set."""
        frac = self.objective.mask_fraction
        if self.training or set_id is None:
            return torch.rand(shape, device=device) < frac
        rows = []
        for sid in torch.as_tensor(set_id).reshape(-1).tolist():
            gen = torch.Generator(device=device)
            gen.manual_seed(self.objective.eval_seed * 1_000_003 + int(sid))
            rows.append(torch.rand(shape[1:], generator=gen, device=device))
        return torch.stack(rows) < frac

    def reconstruct(
        self,
        corrupted: torch.Tensor,
        cell_type: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clean features (B, S, G) predicted from corrupted ones, with the control label;
        ``mask`` (B, S) marks real cells (padding excluded from attention)."""
        control = torch.zeros(corrupted.shape[0], dtype=torch.long, device=corrupted.device)
        return self.predict(
            corrupted,
            control,
            mask,
            cell_type=cell_type if self.cell_type is not None else None,
            batch=batch if self.batch is not None else None,
        )

    def forward(self, batch: Mapping, step: int | torch.Tensor = 0) -> STPretrainOutput:
        """Loss on a batch of group sets (``group_sets.stack_sets``: ``cells`` (B, S, ...),
        per-set ``cell_type``, ``set_id``, ``is_pad``)."""
        cells = batch["cells"]
        clean = cell_features(cells, "gene").float()
        n_sets, set_size = clean.shape[:2]
        device = clean.device
        keep = ~torch.as_tensor(batch["is_pad"], device=device).reshape(n_sets)
        masked = self.gene_mask(clean.shape, device, batch.get("set_id"))
        corrupted = clean.masked_fill(masked, 0.0)
        cell_type = batch.get("cell_type")
        cell_batch = cells.get("obs", {}).get("batch")
        pred = self.reconstruct(
            corrupted,
            cell_type=None if cell_type is None else torch.as_tensor(cell_type, device=device),
            batch=None if cell_batch is None else cell_batch.long(),
        )
        weight = masked.float()
        n_masked = weight.sum((1, 2)).clamp_min(1.0)
        mse = ((pred - clean).square() * weight).sum((1, 2)) / n_masked
        mse_input = (clean.square() * weight).sum((1, 2)) / n_masked  # corrupted = 0 there
        visible = 1.0 - weight
        visible_mse = ((pred - clean).square() * visible).sum((1, 2)) / visible.sum(
            (1, 2)
        ).clamp_min(1.0)
        energy = energy_distance(pred, clean)
        o = self.objective
        total = o.mse_weight * mse + o.energy_weight * energy + o.visible_weight * visible_mse
        sets = keep.float()
        n = sets.sum().clamp_min(1.0)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return (t * sets).sum() / n

        return STPretrainOutput(
            loss=mean(total),
            n_cells=keep.sum() * set_size,
            masked_mse=mean(mse),
            masked_mse_input=mean(mse_input.detach()),
            visible_mse=mean(visible_mse),
            energy=mean(energy),
        )
