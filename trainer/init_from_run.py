"""Start a model from another run's weights, vocabulary by vocabulary (``init.run``).

    latentcell train st --set data.path=VCC_STORE --set init.run=PRETRAIN_RUN

Which tensors are indexed by a vocabulary is declared by the model, never guessed from
shapes: ``STModel.VOCABULARY_AXES`` and each perturbation encoder's list (tensor name, axis,
vocabulary). A hidden size that happens to equal the gene count therefore never makes a
transformer weight look gene-indexed. Every other tensor loads when its name and shape match.
Declared axes are matched by KEY between the run (its model card) and this model:

- **Genes** (the "features" axis of a gene-space model: the cell encoder's input columns,
  the head's output rows and bias): the store's gene keys against the card's ``genes``.
  Equal vocabularies load as is; a reordered one is permuted; an overlapping one copies the
  matched genes' columns and rows, and the run's genes this store lacks are dropped. A gene
  the run did not have is ZERO-FILLED (input column and output row), not left at a random
  initialisation: with zero columns the new genes change nothing at step 0, and the model
  computes what the pretrained model computes on the matched genes (the dropped ones read as
  unexpressed); a random column would add a random projection of the new genes to every
  cell's encoding, noise the fine-tuning must first undo. A zero output row predicts "no
  change from the control" for that gene, which is also how a fresh head starts. Zero
  columns still learn: their gradient is the encoding's gradient times the gene's
  expression. No gene in common is an error (build the store with ``latentcell data build
  --genes-from RUN``).
- **Labels** (a onehot perturbation table, a gene-table encoder's per-gene rows matched by
  gene name, cell-type and batch tables): matched labels are copied; a label the run did not
  have keeps this model's fresh random row (a zero row would embed every new perturbation
  like the control, whose gene-sum vector is exactly zero, and all of them alike). So the
  pretraining's control vector becomes the fine-tuned model's control vector.
- **Derived** tensors (``DERIVED_TENSORS``: the training-control mean, an external
  encoder's file vectors) are this run's own and never copied.
- Latent-space models: latent dimensions have no names; they load as is when both runs are
  in latent space with the same width (the same VAE is assumed), and not at all across
  spaces.

``load_from_run`` returns an ``InitReport``: genes matched / new / dropped, the same per
label vocabulary, and the tensors loaded (as is), remapped (by key) and fresh, by name; the
ST stage hands it to the loop (``init_report``), which prints its two console lines and
writes it to summary.json (``"init"``) and MLflow (``init.json``, params ``init.*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.trained_runs import load_model_card, load_state, weights_path
from latentcell.models.perturbation_encoders import ENCODER_CLASSES
from latentcell.models.perturbation_labels import perturbation_genes
from latentcell.models.st_model import STConfig, STModel

__all__ = ["InitReport", "load_from_run", "load_matching"]

FEATURES = "features"
LABEL_ROLES = ("perturbation", "perturbation_gene", "cell_type", "batch")
_SHOWN = 6  # names per list on the console (summary.json has them all)
_COUNTS = ("run", "model", "matched", "new", "dropped")


@dataclass
class InitReport:
    """What ``load_from_run`` did. ``genes``: the gene mapping (counts, ``order`` "equal",
    "reordered" or "overlap", the first 20 new and dropped keys; None unless both models are
    in gene space with known genes); ``labels``: the counts of each label vocabulary both
    models have a table for; the tensors by name."""

    run_dir: str
    weights: str
    genes: dict[str, Any] | None = None
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Tensors taken from the run (as is or remapped) and kept fresh."""
        return {"loaded": len(self.loaded) + len(self.remapped), "fresh": len(self.fresh)}

    def lines(self) -> list[str]:
        """The two console lines: vocabularies, then tensors."""
        parts = []
        if self.genes is not None:
            g = self.genes
            if g["order"] in ("equal", "reordered"):
                order = {"equal": "same order"}.get(g["order"], g["order"])
                parts.append(f"genes {g['matched']} matched ({order})")
            else:
                parts.append(f"genes {g['matched']} matched, {g['new']} new (zero-filled), "
                             f"{g['dropped']} dropped")  # fmt: skip
        for role, v in self.labels.items():
            parts.append(f"{role} {v['matched']} matched, {v['new']} new (fresh), "
                         f"{v['dropped']} dropped")  # fmt: skip
        head = f"init.run {self.run_dir} ({self.weights})"
        vocab = f"{head}: " + "; ".join(parts) if parts else f"{head}: no vocabulary tensor"
        tensors = (
            f"init.run tensors: {len(self.loaded)} loaded as is, {len(self.remapped)} remapped "
            f"by key{_names(self.remapped)}, {len(self.fresh)} fresh{_names(self.fresh)}"
        )
        return [vocab, tensors]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (summary.json's "init"): scalar entries become MLflow params."""
        return {
            "run_dir": self.run_dir,
            "weights": self.weights,
            "genes": self.genes,
            "labels": self.labels,
            "n_tensors": {
                "loaded": len(self.loaded),
                "remapped": len(self.remapped),
                "fresh": len(self.fresh),
            },
            "tensors": {"loaded": self.loaded, "remapped": self.remapped, "fresh": self.fresh},
            "console": self.lines(),
        }


def _names(names: list[str]) -> str:
    if not names:
        return ""
    more = f" +{len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f" ({', '.join(names[:_SHOWN])}{more})"


@dataclass(frozen=True)
class _Match:
    """Positions of one vocabulary's shared keys in this model's (``new``) and the run's
    (``old``) order, and both sizes."""

    new: torch.Tensor
    old: torch.Tensor
    n_new: int
    n_old: int

    @property
    def identity(self) -> bool:
        n = self.n_new
        return n == self.n_old == len(self.new) and bool(
            torch.equal(self.new, torch.arange(n)) and torch.equal(self.old, torch.arange(n))
        )

    def summary(self, new_keys: list, old_keys: list) -> dict[str, Any]:
        matched = len(self.new)
        if self.identity:
            order = "equal"
        elif matched == self.n_new == self.n_old:
            order = "reordered"
        else:
            order = "overlap"
        have, had = set(old_keys), set(new_keys)
        return {
            "run": self.n_old,
            "model": self.n_new,
            "matched": matched,
            "new": self.n_new - matched,
            "dropped": self.n_old - matched,
            "order": order,
            "new_keys": [str(k) for k in new_keys if k not in have][:20],
            "dropped_keys": [str(k) for k in old_keys if k not in had][:20],
        }


def _match(new_keys: list, old_keys: list) -> _Match:
    where = {k: i for i, k in enumerate(old_keys)}
    pairs = [(i, where[k]) for i, k in enumerate(new_keys) if k in where]
    new = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    old = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return _Match(new, old, len(new_keys), len(old_keys))


def declared_axes(config: STConfig) -> tuple[dict[str, dict[int, str]], set[str]]:
    """({tensor: {axis: vocabulary}}, derived tensors) of an ST model with ``config``, from
    the classes' declarations (nothing is built)."""
    encoder = ENCODER_CLASSES[config.perturbation.kind]
    axes: dict[str, dict[int, str]] = {}
    for prefix, declared in (("", STModel.VOCABULARY_AXES),
                             ("perturbation.", encoder.VOCABULARY_AXES)):  # fmt: skip
        for name, axis, vocabulary in declared:
            axes.setdefault(prefix + name, {})[axis] = vocabulary
    derived = {*STModel.DERIVED_TENSORS, *(f"perturbation.{n}" for n in encoder.DERIVED_TENSORS)}
    return axes, derived


def _vocabularies(
    config: STConfig,
    genes: list[str] | None,
    categories: dict[str, list[str]] | None,
    roles: set[str],
) -> dict[str, list | None]:
    """The keys of each of ``roles`` for a model with ``config`` (None: unknown)."""
    vocab: dict[str, list | None] = dict.fromkeys(roles)
    if config.space == "gene":
        vocab[FEATURES] = None if genes is None else [str(g) for g in genes]
    else:  # latent dimensions have no names: equal widths match as is
        vocab[FEATURES] = [("latent", i, config.n_features) for i in range(config.n_features)]
    labels = None if categories is None else categories.get("perturbation")
    for role in roles & {"cell_type", "batch"}:
        vocab[role] = None if categories is None else categories.get(role)
    if labels is not None:
        vocab["perturbation"] = list(labels)
        if "perturbation_gene" in roles:  # a gene-sum encoder's rows: the labels' genes
            pert = config.perturbation
            genes_of = perturbation_genes(labels, pert.combo_separator, pert.control_label)
            vocab["perturbation_gene"] = list(genes_of)
    return vocab


def _run_vocabularies(card: dict, config: STConfig, roles: set[str]) -> dict[str, list | None]:
    """The run's vocabularies from its card: its genes, its model's perturbation labels (a
    pretraining run has just the control), its stores' cell types and batches."""
    categories = dict(card.get("categories") or {})
    categories["perturbation"] = list(config.perturbation_labels)
    return _vocabularies(config, card.get("genes"), categories, roles)


def load_from_run(
    model: nn.Module,
    run_dir: str | Path,
    genes: list[str] | None = None,
    categories: dict[str, list[str]] | None = None,
) -> InitReport:
    """Copy the run's final weights into ``model`` by name, mapping vocabulary axes by key
    (module docstring). ``genes``: this model's store's gene keys (None: the caller vouches
    they are the run's); ``categories``: its role vocabularies (None: no label table is
    copied). Raises DataValidationError when no gene is shared or nothing loads."""
    run = Path(run_dir)
    card = load_model_card(run)  # a clear error when it is not a finished run
    path = weights_path(run)
    state = load_state(path)
    if isinstance(model, STModel) and "segment" in state:  # saved before it was a module
        state["segment.weight"] = state.pop("segment")
    report = InitReport(run_dir=str(run.absolute()), weights=path.name)
    own = model.state_dict()
    new_axes, old_axes, derived, matches = {}, {}, set(), {}
    if not isinstance(model, STModel) and hasattr(model, "VOCABULARY_AXES"):
        new_axes, derived, matches = _declared_model_axes(model, card, run, genes, report)
        old_axes = new_axes
    elif isinstance(model, STModel):  # other modules: by name and shape only
        theirs = _run_config(card, run)
        new_axes, derived = declared_axes(model.config)
        old_axes, _ = declared_axes(theirs)
        used = {role for axes in new_axes.values() for role in axes.values()}
        new_vocab = _vocabularies(model.config, genes, categories, used)
        old_vocab = _run_vocabularies(card, theirs, used)
        if new_vocab[FEATURES] is None or old_vocab[FEATURES] is None:  # vouched: the same
            for vocab, n in ((new_vocab, model.config.n_features), (old_vocab, theirs.n_features)):
                vocab[FEATURES] = [("as is", i, n) for i in range(n)]  # other widths: none
        for role in sorted(used, key=[FEATURES, *LABEL_ROLES].index):
            mine, its = new_vocab.get(role), old_vocab.get(role)
            if mine is not None and its is not None:
                matches[role] = _match(mine, its)
        genes_known = genes is not None and card.get("genes") is not None
        if FEATURES in matches and genes_known and model.config.space == theirs.space == "gene":
            report.genes = matches[FEATURES].summary(new_vocab[FEATURES], old_vocab[FEATURES])
            _check_overlap(report.genes, run, new_vocab[FEATURES], old_vocab[FEATURES])
        for role in (r for r in LABEL_ROLES if r in matches):  # tables both models have
            if _has_table(own, new_axes, role) and _has_table(state, old_axes, role):
                summary = matches[role].summary(new_vocab[role], old_vocab[role])
                report.labels[role] = {k: summary[k] for k in _COUNTS}

    chosen = {}
    for name, tensor in own.items():
        value, kind = _transfer(
            name, tensor, state.get(name), new_axes.get(name, {}), old_axes.get(name, {}),
            matches, name in derived,
        )  # fmt: skip
        getattr(report, kind).append(name)
        if value is not None:
            chosen[name] = value
    if not chosen:
        raise DataValidationError(
            run, "final weights", "no tensor matches this model's names and shapes",
            "pretrain with the same hidden / depth / heads as this model",
        )  # fmt: skip
    model.load_state_dict(chosen, strict=False)
    return report


def _declared_model_axes(model: nn.Module, card: dict, run: Path, genes, report: InitReport):
    """Axes, derived tensors and vocabulary matches of a non-ST model that declares
    ``VOCABULARY_AXES`` (gene "features" and "perturbation" labels, keyed by the cards'
    ``genes`` and ``config.perturbation_labels``) and ``INIT_CLASSES`` (the run classes it
    starts from: their tensors share its names)."""
    if card.get("class") not in getattr(model, "INIT_CLASSES", ()):
        raise DataValidationError(
            run / "final" / "model_config.json", "class",
            f"a {card.get('class')} run cannot start this model",
            f"init.run takes a run of {' or '.join(model.INIT_CLASSES)}",
        )  # fmt: skip
    axes: dict[str, dict[int, str]] = {}
    for name, axis, vocabulary in model.VOCABULARY_AXES:
        axes.setdefault(name, {})[axis] = vocabulary
    theirs = {FEATURES: card.get("genes"),
              "perturbation": (card.get("config") or {}).get("perturbation_labels")}  # fmt: skip
    mine = {FEATURES: None if genes is None else [str(g) for g in genes],
            "perturbation": list(model.config.perturbation_labels)}  # fmt: skip
    matches = {}
    for role in (FEATURES, "perturbation"):
        if mine[role] is not None and theirs[role] is not None:
            matches[role] = _match(mine[role], list(theirs[role]))
    if FEATURES in matches:
        report.genes = matches[FEATURES].summary(mine[FEATURES], theirs[FEATURES])
        _check_overlap(report.genes, run, mine[FEATURES], theirs[FEATURES])
    if "perturbation" in matches:
        summary = matches["perturbation"].summary(mine["perturbation"], theirs["perturbation"])
        report.labels["perturbation"] = {k: summary[k] for k in _COUNTS}
    return axes, set(getattr(model, "DERIVED_TENSORS", ())), matches


def load_matching(
    model: nn.Module,
    run_dir: str | Path,
    genes: list[str] | None = None,
    categories: dict[str, list[str]] | None = None,
) -> dict[str, int]:
    """``load_from_run``, returning only the counts: tensors loaded (as is or remapped),
    tensors fresh."""
    return load_from_run(model, run_dir, genes, categories).counts()


def _run_config(card: dict, run: Path) -> STConfig:
    try:
        return STConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataValidationError(
            run / "final" / "model_config.json", "config", f"not an ST model's config ({err})",
            "init.run takes a finished st-pretrain or st run",
        ) from err  # fmt: skip


def _check_overlap(genes: dict, run: Path, mine: list, its: list) -> None:
    if genes["matched"] == 0:
        raise DataValidationError(
            run, "genes",
            f"none of the run's {len(its)} genes is among this store's {len(mine)} (the run "
            f"has e.g. {its[0]!r}, the store {mine[0]!r}; genes are matched by key)",
            f"build the store with the run's genes: latentcell data build ... --genes-from {run}",
        )  # fmt: skip


def _has_table(own: dict, axes: dict[str, dict[int, str]], role: str) -> bool:
    return any(name in own and role in a.values() for name, a in axes.items())


def _transfer(
    name: str,
    own: torch.Tensor,
    theirs: torch.Tensor | None,
    axes: dict[int, str],
    their_axes: dict[int, str],
    matches: dict[str, _Match],
    derived: bool,
) -> tuple[torch.Tensor | None, str]:
    """(the value to load or None, "loaded" | "remapped" | "fresh") for one tensor."""
    if derived or theirs is None or axes != their_axes or own.ndim != theirs.ndim:
        return None, "fresh"
    if any(own.shape[d] != theirs.shape[d] for d in range(own.ndim) if d not in axes):
        return None, "fresh"
    if not axes:
        return (theirs, "loaded") if own.shape == theirs.shape else (None, "fresh")
    found = {d: matches.get(role) for d, role in axes.items()}
    if any(
        m is None or m.n_new != own.shape[d] or m.n_old != theirs.shape[d] or not len(m.new)
        for d, m in found.items()
    ):
        return None, "fresh"  # a vocabulary unknown on one side, or nothing shared
    if all(m.identity for m in found.values()):
        return theirs, "loaded"
    out = own.detach().clone()
    for d, role in axes.items():
        if role == FEATURES:  # genes the run lacks start at zero (module docstring)
            missing = torch.ones(own.shape[d], dtype=torch.bool)
            missing[found[d].new] = False
            out.index_fill_(d, torch.nonzero(missing).flatten(), 0.0)
    block = theirs.to(out.dtype)
    for d, m in found.items():
        block = block.index_select(d, m.old)
    dims = sorted(found)
    rest = [d for d in range(out.ndim) if d not in found]
    grid = torch.meshgrid(*(found[d].new for d in dims), indexing="ij")
    out.permute(*dims, *rest)[grid] = block.permute(*dims, *rest)
    return out, "remapped"
