"""ST: a set transformer from a set of control cells plus a perturbation to the perturbed set.

After Arc's State Transition model (read, not copied): the input is a SET of S control cells
of one cell type; the output is S predicted perturbed cells, one per control (a population,
not an average shift), trained with a distributional loss per set (energy distance by
default) plus a mean-delta term.

- Cells are encoded from features: log1p-normalized expression on the store's genes
  (``space="gene"``) or the count VAE's latent (``space="latent"``, decoded downstream).
- Each perturbed-cell token is its control's encoding plus the perturbation embedding (one-hot,
  a gene-embedding table with multi-hot combinations, or external vectors), plus optional
  cell-type and batch embeddings.
- Control-set conditioning, selectable:
  ``joint``: one bidirectional transformer over the 2S tokens [control; perturbed] (a learned
  segment embedding tells them apart), so every perturbed token attends to every control;
  ``cross``: a control-set encoder runs over the controls, and the perturbed tokens
  self-attend among themselves and cross-attend to its output;
  ``sum``: STATE's own form: only the S perturbed tokens (control encoding + perturbation),
  whose self-attention is the control-set conditioning; half the tokens of ``joint``.
- No positional encoding (permutation-equivariant). Residual prediction: the output is the
  control plus a predicted delta, through a ReLU in gene space (expression is non-negative).
- ``shift_path`` (off by default, as in STATE): one shift per set, read from
  the set's perturbation embedding plus its cell-type row (LayerNorm, then a zero-initialised
  linear map to the features), added to every predicted cell beside the transformer's
  per-cell delta. Why: the population-mean effect is most of a perturbation's signal, and
  through the transformer alone it had to be recovered from per-token LayerNorm outputs
  dominated by each cell's own expression: on synthetic data with 8 perturbations x 4 cell
  types (500 genes, mean effects of norm 6-11) the set mean error did not fall at all in 600
  steps at lr 1e-3, 3e-3 or 1e-2, while with this path it fell by half. The transformer then
  models what depends on the cells themselves (state-dependent responses, the spread).
  Why not on by default: on Papalexi 2021 (small effects on sparse genes) the same ST with the
  path learned a large shift that its per-cell output then cancelled, and predicted worse
  than without it (held-out cells, joint: pearson_delta 0.37 against 0.55, mae 0.174
  against 0.111).
- ``target_effect`` (gene space): the perturbed gene's own predicted expression is its
  control's times one learned factor exp(theta), shared by every perturbation
  (``feature_genes`` names the store's genes; a label's genes among them are its targets); the
  predicted delta does not reach those genes. Why: a knockout or knockdown acts first on its
  target; a target-specific delta learned per perturbation never transfers to an unseen
  target, while one shared factor (learned from the training targets that are measured) does,
  and only if the per-perturbation embedding cannot absorb the knockdown of the seen ones.
  theta starts at 0, so the model still starts as control identity.
- ``perturbation_dropout`` (training): the probability that a perturbed set's embedding is
  replaced by one learned "generic perturbation" vector, so the model also learns the
  population a perturbation of unknown identity leads to (its own training-mean). Prediction
  uses that vector only when asked (``generic``), e.g. for a zero-shot target without a
  trained embedding: an explicit choice, never a silent stand-in.
- ``cell_type_dropout`` (training, cell-type-conditioned models): the probability that a
  training set is treated as of an UNKNOWN cell type: its cell-type row is replaced by one
  learned "unknown cell type" vector and (``basal="train"``) its own set mean is its basal.
  Why this and not training the rows on control sets as well: a cell type held out whole
  (``[split.cell_types]``) has no training cell at all, so no loss can reach its row, and a
  row trained only to reproduce its controls would claim "no response" for that type. The
  unknown vector is the model's answer for a context it has no parameters for (the average
  response over the training types), while the set's own controls still carry the type's
  expression. Prediction uses that route only when asked (``unknown``): a cell type without
  training sets is otherwise refused by the predictors, never given its random row.
- ``basal``: what the residual starts from. ``"set"`` (STATE's form): the control cells as
  given. ``"train"``: each control set is first re-centred on the training controls' mean
  OF ITS CELL TYPE (``control_mean``, one row per cell type of the store whether or not the
  model is cell-type-conditioned, filled in by the stage): x_i - mean_set(x) + mean_train.
  A pooled mean would move every type's controls to the average of all types (on two types
  of different means that made the prediction worse than the control identity). A set whose
  type has no training controls has no such mean: the predictors refuse it, or (``unknown``)
  give it its own set mean, as ``"set"`` does.
  Why: a set of S controls has a mean that is off by about sd/sqrt(S) on every gene, and with
  ``"set"`` every predicted population inherits that error; the training controls (thousands
  of cells of the same population) estimate it far better. The cells' own variation is kept.
  Use ``"train"`` when predicted controls come from the training population (the VCC setting:
  same cell line, same experiment); keep ``"set"`` when the controls at predict time come
  from a context the training controls do not represent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from .count_vae import normalize_log1p
from .perturbation_encoders import (
    PerturbationEncoderConfig,
    make_perturbation_encoder,
    target_columns,
)
from .set_losses import SetLossConfig, set_loss
from .set_transformer import SetBlock

__all__ = ["STConfig", "STModel", "STOutput", "STShape", "SetLossOutput", "cell_features"]

CONDITIONING = ("joint", "cross", "sum")
SPACES = ("gene", "latent")
BASALS = ("set", "train")


@dataclass(frozen=True)
class STShape:
    """The transformer's shape and control-set conditioning. The stages' model sections are
    ``STShape`` too, so ``model.hidden`` etc. mean (and are checked) the same in
    st-pretrain and st, and pretrained tensors have the fine-tuned model's shapes."""

    conditioning: str = "joint"
    hidden: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}")
        if min(self.hidden, self.depth, self.heads) < 1:
            raise ValueError("hidden, depth and heads must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    def shape_kwargs(self) -> dict:
        """The ``STShape`` fields by name, as a model section hands them to ``STConfig``."""
        return {f.name: getattr(self, f.name) for f in fields(STShape)}


@dataclass(frozen=True, kw_only=True)
class STConfig(STShape):
    """n_features: input (and output) width: genes for ``space="gene"``, latent dims for
    ``"latent"``. n_cell_types / n_batches: 0 leaves the covariate out. control_depth: blocks
    of the control-set encoder in ``cross`` mode (0 = depth // 2, at least 1).
    basal_cell_types: rows of the training-control mean for ``basal="train"``: the store's
    cell types, whatever the conditioning (0, in cards written before this field: one row per
    conditioned cell type, or one pooled row)."""

    n_features: int
    perturbation_labels: tuple[str, ...]
    space: str = "gene"
    basal: str = "set"
    control_depth: int = 0
    n_cell_types: int = 0
    n_batches: int = 0
    target_effect: bool = False
    perturbation_dropout: float = 0.0
    cell_type_dropout: float = 0.0
    basal_cell_types: int = 0
    shift_path: bool = False
    feature_genes: tuple[str, ...] = ()
    perturbation: PerturbationEncoderConfig = field(default_factory=PerturbationEncoderConfig)
    loss: SetLossConfig = field(default_factory=SetLossConfig)

    def __post_init__(self) -> None:
        check_space(self.space)
        check_basal(self.basal)
        super().__post_init__()
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if min(self.n_cell_types, self.n_batches, self.control_depth, self.basal_cell_types) < 0:
            raise ValueError(
                "n_cell_types, n_batches, control_depth and basal_cell_types must be >= 0"
            )
        if not self.perturbation_labels:
            raise ValueError("perturbation_labels must name at least one perturbation")
        object.__setattr__(self, "perturbation_labels", tuple(self.perturbation_labels))
        object.__setattr__(self, "feature_genes", tuple(self.feature_genes))
        if not 0.0 <= self.perturbation_dropout < 1.0:
            raise ValueError(
                f"perturbation_dropout must be in [0, 1), got {self.perturbation_dropout}"
            )
        if not 0.0 <= self.cell_type_dropout < 1.0:
            raise ValueError(f"cell_type_dropout must be in [0, 1), got {self.cell_type_dropout}")
        if self.cell_type_dropout and not self.n_cell_types:
            raise ValueError("cell_type_dropout needs cell-type conditioning (n_cell_types > 0)")
        if self.target_effect and (
            self.space != "gene" or len(self.feature_genes) != self.n_features
        ):
            raise ValueError(
                "target_effect acts on the perturbed gene's own expression: it needs "
                f"space='gene' (got {self.space!r}) and feature_genes naming the "
                f"{self.n_features} features (got {len(self.feature_genes)})"
            )

    @classmethod
    def from_dict(cls, data: Mapping) -> STConfig:
        """The config a model card saved (``dataclasses.asdict``), nested configs rebuilt."""
        c = dict(data)
        c["perturbation"] = PerturbationEncoderConfig(**c["perturbation"])
        c["loss"] = SetLossConfig(**{**c["loss"], "bandwidths": tuple(c["loss"]["bandwidths"])})
        c["perturbation_labels"] = tuple(c["perturbation_labels"])
        c["feature_genes"] = tuple(c.get("feature_genes", ()))
        c.setdefault("shift_path", False)  # cards written before the shift path
        return cls(**c)


def check_basal(basal: str) -> None:
    """STConfig's rule for ``basal``; the fine-tuning stage checks it when reading its config."""
    if basal not in BASALS:
        raise ValueError(f"basal must be one of {BASALS}, got {basal!r}")


def check_space(space: str) -> None:
    """STConfig's rule for ``space``; the fine-tuning stage checks it when reading its config."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")


@dataclass
class SetLossOutput:
    """A set model's loss, its real cells and its loss terms (the fields after these two)."""

    loss: torch.Tensor
    n_cells: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor | float]:
        """Every field but ``n_cells``, detached, for the logs."""
        return {f.name: getattr(self, f.name).detach() for f in fields(self) if f.name != "n_cells"}


@dataclass
class STOutput(SetLossOutput):
    distribution: torch.Tensor
    mean_delta: torch.Tensor


def is_exporting() -> bool:
    """Whether a graph is being captured (ONNX tracing, torch.export, torch.compile): checks
    that branch on tensor values are left to eager calls, where they can raise."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def cell_features(part: Mapping, space: str) -> torch.Tensor:
    """Model input for one side of a pair batch: ``features`` when the stage put them there
    (VAE latents), else log1p-normalized counts (library sizes from the store)."""
    if "features" in part:
        return part["features"].float()
    if space == "latent":
        raise KeyError("space='latent' needs the stage to provide batch[...]['features']")
    X = part["X"]
    X = X.to_dense() if X.layout != torch.strided else X
    library = part["library_size"].to(X.dtype)
    shape = X.shape
    flat = normalize_log1p(X.reshape(-1, shape[-1]).float(), library.reshape(-1))
    return flat.reshape(shape)


def _mlp(n_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class STModel(nn.Module):
    # Tensors indexed by a vocabulary, as (name, axis, vocabulary): "features" is the store's
    # genes in gene space (the VAE's latent dimensions in latent space), "cell_type" and
    # "batch" the store's labels; the perturbation encoders declare their own. Every other
    # tensor has no vocabulary axis, whatever its shape (a hidden size equal to the gene
    # count included). ``trainer/init_from_run.py`` maps these axes by key when a run starts
    # from another run's weights.
    VOCABULARY_AXES = (
        ("cell_encoder.0.weight", 1, "features"),
        ("head.weight", 0, "features"),
        ("head.bias", 0, "features"),
        ("shift_head.weight", 0, "features"),
        ("shift_head.bias", 0, "features"),
        ("cell_type.weight", 0, "cell_type"),
        ("batch.weight", 0, "batch"),
    )
    DERIVED_TENSORS = ("control_mean",)  # filled from this run's data, never copied

    def __init__(self, config: STConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.hidden
        self.cell_encoder = _mlp(c.n_features, h)
        pert = replace(c.perturbation, dim=h)
        self.perturbation = make_perturbation_encoder(pert, list(c.perturbation_labels))
        self.cell_type = nn.Embedding(c.n_cell_types, h) if c.n_cell_types else None
        self.batch = nn.Embedding(c.n_batches, h) if c.n_batches else None
        # control, perturbed (joint mode). A module, not a bare Parameter indexed in predict:
        # under ZeRO-3 a Parameter indexed outside a module call is not gathered for the
        # backward pass (it failed with a size mismatch). Zero-filled, then initialized below,
        # so the random stream (and every other layer's initial weights) stays as it was.
        self.segment = nn.Embedding(2, h, _weight=torch.zeros(2, h))
        cross = c.conditioning == "cross"
        self.blocks = nn.ModuleList(
            SetBlock(h, c.heads, c.mlp_ratio, c.dropout, cross) for _ in range(c.depth)
        )
        n_ctx = (c.control_depth or max(1, c.depth // 2)) if cross else 0
        self.control_blocks = nn.ModuleList(
            SetBlock(h, c.heads, c.mlp_ratio, c.dropout, False) for _ in range(n_ctx)
        )
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, c.n_features)
        if c.basal == "train":  # one row per cell type (NaN: no training controls)
            rows = c.basal_cell_types or max(1, c.n_cell_types)
            self.register_buffer("control_mean", torch.full((rows, c.n_features), float("nan")))
        if c.cell_type_dropout:
            self.unknown_cell_type = nn.Parameter(torch.randn(h) * h**-0.5)
        # Which cell types had training sets (the stage fills it; not saved: the model card's
        # ``trained_cell_types`` is the record). Training and validation route the others
        # through the unknown cell type, and nothing else.
        n_types = max(c.n_cell_types, c.basal_cell_types if c.basal == "train" else 0)
        self.register_buffer("cell_type_trained", torch.ones(n_types, dtype=torch.bool),
                             persistent=False)  # fmt: skip
        if c.target_effect:
            self.target_log_factor = nn.Parameter(torch.zeros(()))
            self.register_buffer("target_mask", self._target_mask(), persistent=False)
        if c.perturbation_dropout:
            self.generic_perturbation = nn.Parameter(torch.randn(h) * h**-0.5)
        if c.shift_path:  # one shift per set from its (perturbation, cell type): see above
            self.shift_norm = nn.LayerNorm(h)
            self.shift_head = nn.Linear(h, c.n_features)
            nn.init.zeros_(self.shift_head.weight)
            nn.init.zeros_(self.shift_head.bias)
        nn.init.zeros_(self.head.weight)  # starts as the control-identity baseline
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.segment.weight, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved before ``segment`` became a module name it ``segment``."""
        if prefix + "segment" in state_dict:
            state_dict[prefix + "segment.weight"] = state_dict.pop(prefix + "segment")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def target_rows(self, labels: list[str]) -> torch.Tensor:
        """(len(labels), features): 1 where a feature is one of the label's perturbed genes
        (any label, in the vocabulary or not: genes are matched by name)."""
        pert = self.config.perturbation
        index = {g: i for i, g in enumerate(self.config.feature_genes)}
        mask = torch.zeros(len(labels), self.config.n_features)
        for row, label in enumerate(labels):
            mask[row, target_columns(label, index, pert.combo_separator, pert.control_label)] = 1.0
        return mask

    def _target_mask(self) -> torch.Tensor:
        return self.target_rows(list(self.perturbation.labels))

    @property
    def uses_cell_type(self) -> bool:
        """Whether ``predict`` needs the sets' cell-type codes: for the cell-type embedding,
        or for the per-type training-control mean of ``basal="train"``."""
        c = self.config
        return self.cell_type is not None or (c.basal == "train" and c.basal_cell_types > 0)

    @property
    def takes_unknown(self) -> bool:
        """Whether ``predict`` can route a set through the unknown cell type: the learned
        vector of a cell-type-conditioned model (``cell_type_dropout``), or for a model
        without cell-type conditioning, the set's own mean as basal (``basal="train"``)."""
        if self.cell_type is not None:
            return self.config.cell_type_dropout > 0
        return self.uses_cell_type

    def known_cell_types(self) -> torch.Tensor:
        """(cell types,) bool: the types ``predict`` has trained parameters for: a row trained
        on training sets (cell-type conditioning) and a training-control mean (basal
        "train")."""
        known = self.cell_type_trained.clone() if self.cell_type is not None else None
        if self.config.basal == "train" and self.config.basal_cell_types:
            has_mean = ~torch.isnan(self.control_mean).any(1)
            known = has_mean if known is None else known & has_mean
        return torch.ones(0, dtype=torch.bool) if known is None else known

    def set_trained_cell_types(self, trained: torch.Tensor) -> None:
        """Which cell types had training sets (bool per type of the store), for the
        routing of training and validation sets (``forward``)."""
        trained = torch.as_tensor(trained, dtype=torch.bool).reshape(-1)
        if trained.shape != self.cell_type_trained.shape:
            raise ValueError(
                f"expected {self.cell_type_trained.numel()} cell types, got {trained.numel()}"
            )
        self.cell_type_trained.copy_(trained)

    @property
    def control_code(self) -> int:
        """The control label's code (-1 when the vocabulary has none): never made generic."""
        labels = self.perturbation.labels
        control = self.config.perturbation.control_label
        return labels.index(control) if control in labels else -1

    def extend(self, names: list[str]) -> torch.Tensor:
        """Codes of ``names`` (the encoder's ``extend``: new combinations of known genes),
        with their target rows added when the model has ``target_effect``."""
        codes = self.perturbation.extend(names)
        if self.config.target_effect and self.target_mask.shape[0] != len(self.perturbation.labels):
            self.target_mask = self._target_mask().to(self.target_mask.device)
        return codes

    def predict(
        self,
        control: torch.Tensor,
        perturbation: torch.Tensor,
        mask: torch.Tensor | None = None,
        cell_type: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        generic: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        unknown: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Perturbed features (B, S, F) for control features (B, S, F), perturbation codes
        (B,), real-cell mask (B, S), cell-type codes (B,) and per-cell batch codes (B, S).
        ``generic`` (B,) bool: sets that take the generic perturbation vector instead of their
        code's (needs ``perturbation_dropout``); ``targets`` (B, F): the perturbed genes for
        ``target_effect`` when not the codes' own (``target_rows``). ``unknown`` (B,) bool:
        sets of an unknown cell type (``takes_unknown``): the learned unknown vector instead
        of their cell-type row, and with ``basal="train"`` their own set mean as basal (their
        codes are then only read as placeholders: pass any valid code, e.g. 0)."""
        c = self.config
        if unknown is not None and not self.takes_unknown:
            raise ValueError(
                "unknown needs a model trained with cell_type_dropout > 0 (or, without "
                "cell-type conditioning, basal='train')"
            )
        if c.basal == "train":
            control = self.recentre(control, mask, cell_type, unknown)
        base = self.cell_encoder(control.to(self.head.weight.dtype))
        context = 0.0  # the set's (perturbation, cell type) for the shift path
        if self.cell_type is not None:
            if cell_type is None:
                raise ValueError("the model is cell-type-conditioned: pass cell_type")
            rows = self.cell_type(cell_type)
            if unknown is not None:
                vector = self.unknown_cell_type.to(rows.dtype)
                rows = torch.where(unknown[:, None], vector, rows)
            base = base + rows[:, None]
            context = rows
        if self.batch is not None:
            if batch is None:
                raise ValueError("the model is batch-conditioned: pass batch")
            base = base + self.batch(batch)
        segments = self.segment(torch.arange(2, device=base.device))
        ctrl = base + segments[0]
        embedding = self.perturbation(perturbation)
        if generic is not None:
            if not c.perturbation_dropout:
                raise ValueError("generic needs a model trained with perturbation_dropout > 0")
            vector = self.generic_perturbation.to(embedding.dtype)
            embedding = torch.where(generic[:, None], vector, embedding)
        query = base + segments[1] + embedding[:, None]
        s = control.shape[1]
        if c.conditioning == "joint":
            x = torch.cat([ctrl, query], dim=1)
            both = None if mask is None else torch.cat([mask, mask], dim=1)
            for block in self.blocks:
                x = block(x, both)
            x = x[:, s:]
        elif c.conditioning == "sum":
            x = query
            for block in self.blocks:
                x = block(x, mask)
        else:
            for block in self.control_blocks:
                ctrl = block(ctrl, mask)
            x = query
            for block in self.blocks:
                x = block(x, mask, ctrl, mask)
        out = control.float() + self.head(self.norm(x)).float()
        if c.shift_path:
            shift = self.shift_head(self.shift_norm(embedding + context))
            out = out + shift.float()[:, None]
        if c.space != "gene":
            return out
        out = torch.relu(out)
        if c.target_effect:  # the target's own expression: its control's, times one factor
            rows = self.target_mask[perturbation] if targets is None else targets.to(out.dtype)
            knocked = torch.relu(control.float()) * torch.exp(self.target_log_factor)
            out = torch.where(rows[:, None] > 0, knocked, out)
        return out

    def _unknown_sets(self, cell_type: torch.Tensor) -> torch.Tensor | None:
        """The sets a batch routes through the unknown cell type: those of types without
        trained parameters (validation of a held-out type), and in training a share
        ``cell_type_dropout`` of all. None where the model has nothing to route."""
        if not self.uses_cell_type:
            return None
        known = self.known_cell_types().to(cell_type.device)
        unknown = ~known[cell_type]
        if self.training and self.config.cell_type_dropout:
            drop = torch.rand(cell_type.shape, device=cell_type.device)
            unknown = unknown | (drop < self.config.cell_type_dropout)
        if not self.takes_unknown:
            if unknown.any():
                raise ValueError(
                    f"cell types {sorted(set(cell_type[unknown].tolist()))} have no trained "
                    "cell-type row and this model learned no unknown cell type "
                    "(cell_type_dropout > 0)"
                )
            return None
        return unknown

    def set_control_mean(self, mean: torch.Tensor) -> None:
        """The training controls' mean features (rows: cell types, or one row), for
        ``basal="train"``; a row of NaN marks a cell type without training controls."""
        if self.config.basal != "train":
            raise ValueError("control_mean is only used with basal='train'")
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(self.control_mean.shape)
        self.control_mean.copy_(mean)

    def recentre(
        self,
        control: torch.Tensor,
        mask: torch.Tensor | None,
        cell_type: torch.Tensor | None,
        unknown: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_i - mean_set(x) + control_mean[cell type] over the real (unmasked) cells; the
        sets marked ``unknown`` keep their own mean (x unchanged)."""
        x = control.float()
        if mask is None:
            set_mean = x.mean(1, keepdim=True)
        else:
            w = mask.to(x.dtype)[..., None]
            set_mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        rows = self.control_mean.shape[0]
        if cell_type is not None:
            target = self.control_mean[cell_type]
        elif rows == 1:  # one cell type, or a run from before per-type re-centring
            target = self.control_mean[:1].expand(x.shape[0], -1)
        else:
            raise ValueError("basal='train' re-centres per cell type: pass cell_type")
        if unknown is not None:
            target = torch.where(unknown[:, None], set_mean[:, 0], target.to(x.dtype))
        exporting = is_exporting()
        if not exporting and torch.isnan(target).any():
            raise ValueError(
                "basal='train' has no training-control mean for this cell type: the stage "
                "fills control_mean from the training controls (set_control_mean); a cell "
                "type without training controls needs unknown=True (its own set mean)"
            )
        return x - set_mean + target[:, None].to(x.dtype)

    def forward(self, batch: Mapping, step: int | torch.Tensor = 0) -> STOutput:
        """Loss on a batch of (control set, perturbed set) pairs from the set sampler."""
        control = cell_features(batch["control"], self.config.space)
        target = cell_features(batch["perturbed"], self.config.space)
        n_sets, set_size = control.shape[:2]
        keep = ~torch.as_tensor(batch["is_pad"], device=control.device).reshape(n_sets)
        cell_batch = batch["control"].get("obs", {}).get("batch") if self.batch else None
        cell_type = torch.as_tensor(batch["cell_type"], device=control.device).long()
        codes = torch.as_tensor(batch["perturbation"], device=control.device).long()
        generic = None
        if self.training and self.config.perturbation_dropout:
            drop = torch.rand(codes.shape, device=codes.device) < self.config.perturbation_dropout
            generic = drop & (codes != self.control_code)
        pred = self.predict(
            control,
            codes,
            cell_type=cell_type if self.uses_cell_type else None,
            batch=None if cell_batch is None else cell_batch.long(),
            generic=generic,
            unknown=self._unknown_sets(cell_type),
        )
        terms = set_loss(self.config.loss, pred, target, control)
        weight = keep.float()
        n = weight.sum().clamp_min(1)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return (t * weight).sum() / n

        return STOutput(
            loss=mean(terms["total"]),
            n_cells=keep.sum() * set_size,
            distribution=mean(terms["distribution"]),
            mean_delta=mean(terms["mean"]),
        )
