"""The honest baselines for perturbation prediction, fitted on TRAINING cells only.

Each maps control cells (log1p-normalized, the model's genes) to predicted cells by adding a
per-gene shift, so predictions keep the controls' cell-to-cell variation (constant cells
would break cell-eval's Mann-Whitney DE); all go through ``trainer.predict``'s one path.

Every shift is composition-matched. A training *context* is a cell type, split by batch where
the training file has a batch column. For a perturbation p, in a feature space x (log1p
expression, or a count VAE's latent z):

    delta_p(t) = mean over the batches b of cell type t holding both p-cells and controls of
                 [ mean x(p-cells in t, b) - mean x(controls in t, b) ]
                 (t's cells over all its batches when no batch holds both)
    shift_p(t) = delta_p(t)                              if t is seen: t has p-cells and controls
               = mean over the seen types t' of delta_p(t')      otherwise (a held-out context)

Perturbed cells are never compared with another context's controls: when p was measured in some
cell types and batches and the controls in others, the old pooled difference mixed the
response with the difference between the contexts (with a cell type held out, predictions
landed on the other types' perturbed centroid). Each context counts once, whatever its number
of cells (equal per batch within a type, then equal per type): a context is one measurement of
the response, and weighting by cells would make the shift depend on how many cells a screen
happened to put in each context, which is the composition the matching removes. A seen type
gets its own delta, not the pooled one: the pooled average is biased by the other types'
responses, which differ (the reason for per-type arithmetic in scGen), and every seen type has
controls and p-cells of its own to estimate it from.

- ``control``: x (no effect).
- ``mean``: x + mean over the training perturbations p of shift_p(t): the training mean
  response, each perturbation counted once.
- ``additive``: x + sum over the genes g of p of shift_g(t); for a single perturbation seen in
  training, its own shift (the "perturbation mean"); ``A+B`` gets shift_A + shift_B.
- ``linear`` (Ahlmann-Eltze et al. 2025): x + b(t) + G W e_p. Y (genes x single-gene training
  perturbations) holds the pooled shifts (shift_p of a held-out type), b = Y's row mean, G the
  top-K PCA gene loadings of the training expression, e_p a perturbation's embedding (the row
  of G of a measured target, so unseen measured targets can be predicted; else a seen target's
  response G^T (y_p - b)), W the ridge solution of Y - b ~ G W E^T; b(t) = mean over the
  single-gene perturbations of shift_g(t) (= b for a held-out type).
- ``latent``: latent arithmetic (scGen): decode(z + shift^z_p(t)), the shift computed as above
  on the count VAE's latents z of the training cells.

With one training perturbation, ``mean``, ``additive`` and ``linear`` give the same shift
(W = 0 and b(t) = shift_p(t)); ``coincidence_note`` says so rather than report duplicates.

``target_effect=True`` (any but ``control`` and ``latent``; named ``NAME+target``): the
perturbed genes' own predicted expression is then multiplied by one factor, the median over
the measured training targets of (their mean log1p expression in their own perturbation) /
(in the controls of the same contexts), both context-matched as above: the same prior as the ST
model's ``target_effect``, so that a model with it is compared with baselines that have it too.

``basal="train"`` (as the ST model's option): the given controls are first re-centred on the
training controls' mean of their cell type (left as given for a type without training
controls), so the baselines and an ST trained with ``model.basal=train`` start from the same
cells; ``"set"`` uses the controls as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.inference.predict import _dense, _gene_matrix, log1p_normalize
from latentcell.models.perturbation_encoders import split_genes, target_columns

__all__ = [
    "BASELINES",
    "ContextShifts",
    "LatentArithmetic",
    "ShiftBaseline",
    "TargetEffect",
    "coincidence_note",
    "coincident_groups",
    "fit_baseline",
    "target_factor",
]

BASELINES = ("control", "mean", "additive", "linear", "latent")
SHIFT_BASELINES = ("control", "mean", "additive", "linear")
BASALS = ("set", "train")


def recentre(control: np.ndarray, basal_mean: np.ndarray) -> np.ndarray:
    """The controls' own variation around ``basal_mean`` (their mean replaced by it)."""
    return control - control.mean(0, keepdims=True) + basal_mean[None]


class _Training:
    """Training cells in log1p on the model's genes, with their perturbation, cell type and
    batch (one constant label where the file has no such column)."""

    def __init__(
        self, train, genes, pert_col, control_label, cell_type_col, source, batch_col=None
    ):
        if pert_col not in train.obs:
            raise DataValidationError(
                source, pert_col, "missing obs column", f"pass a training file with {pert_col}"
            )
        counts = _dense(train.X)
        self.x = log1p_normalize(counts[:, _gene_matrix(train, genes, source)], counts.sum(1))
        self.pert = train.obs[pert_col].astype(str).to_numpy()
        self.cell_type, self.batch = (
            train.obs[col].astype(str).to_numpy()
            if col and col in train.obs
            else np.full(train.n_obs, "")
            for col in (cell_type_col, batch_col)
        )
        self.control_label, self.source = control_label, source
        self.is_control = self.pert == control_label
        if not self.is_control.any():
            raise DataValidationError(
                source, pert_col, f"no {control_label!r} cells", "include the training controls"
            )
        self.labels = list(pd.unique(self.pert[~self.is_control]))

    def control_mean(self, cell_type: str | None = None) -> np.ndarray | None:
        """Mean of the training controls of ``cell_type`` (of all of them for None); None
        when that type has no training controls."""
        rows = self.is_control & ((self.cell_type == cell_type) if cell_type is not None else True)
        return self.x[rows].mean(0) if rows.any() else None

    def context_means(self, features: np.ndarray) -> dict[str, dict[str, tuple]]:
        """Perturbation -> cell type -> (mean ``features`` of its cells, of the controls), each
        the mean over the type's batches holding both (the type's cells when none does); only
        types holding both. See the module docstring. One pass over the cells."""
        keys = pd.MultiIndex.from_arrays([self.pert, self.cell_type, self.batch])
        codes, groups = pd.factorize(keys)
        member = sp.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(groups), len(codes))
        )
        sums = np.asarray(member @ np.asarray(features, dtype=np.float64))
        means = sums / np.bincount(codes, minlength=len(groups))[:, None]
        controls, batches = {}, {}
        for (label, cell_type, batch), mean in zip(groups, means, strict=True):
            if label == self.control_label:
                controls[cell_type, batch] = mean
            else:
                batches.setdefault(label, {}).setdefault(cell_type, []).append((batch, mean))
        out = {}
        for label in self.labels:
            out[label] = {}
            for cell_type, parts in batches[label].items():
                pairs = [
                    (m, controls[cell_type, b]) for b, m in parts if (cell_type, b) in controls
                ]
                if not pairs:  # no batch holds both: the type's cells, unmatched by batch
                    in_type = self.cell_type == cell_type
                    p_rows, c_rows = (self.pert == label) & in_type, self.is_control & in_type
                    if not c_rows.any():
                        continue
                    pairs = [(features[p_rows].mean(0), features[c_rows].mean(0))]
                out[label][str(cell_type)] = tuple(
                    np.mean(side, axis=0) for side in zip(*pairs, strict=True)
                )
        return out


class ContextShifts:
    """shift_p(t) of the module docstring, in one feature space (log1p or a VAE's latent)."""

    def __init__(self, data: _Training, features: np.ndarray) -> None:
        self.source = data.source
        self.deltas = {
            label: {t: p - c for t, (p, c) in per_type.items()}
            for label, per_type in data.context_means(features).items()
        }

    def seen(self, label: str) -> list[str]:
        """The cell types whose own delta ``label`` has."""
        return list(self.deltas.get(label, {}))

    def __call__(self, label: str, cell_type: str | None) -> np.ndarray:
        """The type's own delta when seen, else (and for ``cell_type=None``) the mean of the
        seen types' deltas."""
        per_type = self.deltas.get(label)
        if per_type is None:
            raise DataValidationError(
                self.source, "perturbation", f"no training cells of {label!r}",
                "a baseline's shift needs the perturbation's cells in training",
            )  # fmt: skip
        if not per_type:
            raise DataValidationError(
                self.source, "perturbation",
                f"no training cell type holds both {label!r} cells and control cells",
                "include control cells of the cell types the perturbation was measured in",
            )  # fmt: skip
        if cell_type in per_type:
            return per_type[cell_type]
        return np.mean(list(per_type.values()), axis=0)


class ShiftBaseline:
    """Prediction = control + shift(perturbation, cell type), clipped at 0; with
    ``basal_mean`` (cell type -> mean or None) the controls are re-centred on it first."""

    def __init__(self, name: str, genes: list[str], shift, control_label: str, basal_mean=None):
        self.name, self.genes, self._shift, self.control_label = name, genes, shift, control_label
        self._basal_mean = basal_mean
        self.siblings = None  # set by fit_baseline: kind -> that baseline on the same fit

    def shift(self, perturbation: str, cell_type: str) -> np.ndarray:
        return np.asarray(self._shift(perturbation, cell_type), dtype=np.float32)

    def predict(self, control, perturbation: str, cell_type: str, library=None, rng=None):
        mean = self._basal_mean(cell_type) if self._basal_mean is not None else None
        if mean is not None:
            control = np.clip(recentre(control, mean), 0, None)
        if perturbation == self.control_label:
            return control
        return np.clip(control + self.shift(perturbation, cell_type)[None], 0, None)


class TargetEffect:
    """``inner``'s prediction with each perturbed gene's own expression times ``factor``."""

    def __init__(self, inner: ShiftBaseline, symbols: list[str], factor: float) -> None:
        self.inner, self.genes, self.factor = inner, inner.genes, float(factor)
        self.name = f"{inner.name}+target"
        self._index = {g: i for i, g in enumerate(symbols)}

    def predict(self, control, perturbation: str, cell_type: str, library=None, rng=None):
        out = self.inner.predict(control, perturbation, cell_type, library, rng)
        if perturbation == self.inner.control_label:
            return out
        columns = target_columns(perturbation, self._index, "+", self.inner.control_label)
        out = out.copy()
        out[:, columns] *= self.factor
        return out


def target_factor(data: _Training, symbols: list[str]) -> float:
    """Median over measured single-gene training targets g of mean log1p(g | its
    perturbation) / mean log1p(g | controls), both averaged over the same contexts (module
    docstring); targets unexpressed in those controls skipped."""
    index = {g: i for i, g in enumerate(symbols)}
    targets = {}
    for label in data.labels:
        columns = target_columns(label, index, "+", data.control_label)
        if len(split_genes(label, "+", data.control_label)) == 1 and columns:
            targets[label] = columns[0]
    columns = sorted(set(targets.values()))
    by_label = data.context_means(data.x[:, columns]) if columns else {}
    ratios = []
    for label, column in targets.items():
        at = columns.index(column)
        means = [(p[at], c[at]) for p, c in by_label[label].values()]
        if means:
            pert, control = (float(np.mean(side)) for side in zip(*means, strict=True))
            if control > 0:
                ratios.append(pert / control)
    if not ratios:
        raise DataValidationError(
            data.source, "perturbation",
            "no single-gene training perturbation targets a measured gene expressed in the "
            "controls, so the target effect cannot be fitted",
            "drop target_effect (--target-effect), or train on measured targets",
        )  # fmt: skip
    return float(np.median(ratios))


class LatentArithmetic:
    """scGen's latent arithmetic on the count VAE: decode(z + shift_p(t)), the shift computed
    in the latent space as in the module docstring (a held-out cell type gets the mean of
    the seen types' deltas, never another type's perturbed cells minus its own controls)."""

    name = "latent"

    def __init__(self, bridge, data: _Training, basal: str = "set") -> None:
        self.bridge, self.genes, self.control_label = bridge, bridge.genes(), data.control_label
        z = bridge.encode_numpy(data.x)
        self.shifts = ContextShifts(data, z)
        self._basal = basal
        self._control_z = {
            t: z[data.is_control & (data.cell_type == t)].mean(0)
            for t in pd.unique(data.cell_type[data.is_control])
        }
        self.source = data.source

    def shift(self, perturbation: str, cell_type: str) -> np.ndarray:
        """The latent shift added to a control of ``cell_type``."""
        if perturbation not in self.shifts.deltas:
            raise DataValidationError(
                self.source, "perturbation", f"no training cells of {perturbation!r}",
                "latent arithmetic can only predict perturbations seen in training",
            )  # fmt: skip
        return self.shifts(perturbation, cell_type)

    def predict(self, control, perturbation: str, cell_type: str, library=None, rng=None):
        """Decoded cells: sampled from the VAE's likelihood when ``library`` and ``rng`` are
        given (the prediction path), else the decoder's mean."""
        z = self.bridge.encode_numpy(control)
        basal = self._control_z.get(cell_type) if self._basal == "train" else None
        if basal is not None:  # in the latent space the arithmetic works in
            z = recentre(z, basal)
        if perturbation == self.control_label and self._basal == "set":
            return control
        if perturbation == self.control_label:
            return self._decode(z, library, rng)
        return self._decode(z + self.shift(perturbation, cell_type), library, rng)

    def _decode(self, z: np.ndarray, library, rng) -> np.ndarray:
        if library is None or rng is None:
            return self.bridge.decode_numpy(z)
        return self.bridge.sample(z, library, rng)


def fit_baseline(
    name: str,
    train: ad.AnnData,
    genes: list[str],
    pert_col: str = "target_gene",
    control_label: str = "non-targeting",
    cell_type_col: str | None = "cell_type",
    source: str = "--train",
    n_components: int = 10,
    ridge: float = 0.1,
    gene_symbols: list[str] | None = None,
    vae_run: str | None = None,
    basal: str = "set",
    target_effect: bool = False,
    batch_col: str | None = "batch",
    bridge=None,
) -> ShiftBaseline | LatentArithmetic | TargetEffect:
    """Fit baseline ``name`` on ``train`` (counts) over ``genes`` (the model's gene keys);
    ``gene_symbols`` name the same genes as perturbation labels do (default: the keys).
    Shifts are matched within ``cell_type_col`` and ``batch_col`` where the file has them.
    ``latent`` needs ``vae_run`` (a count VAE run) or an already loaded ``bridge`` (genes(),
    encode_numpy, decode_numpy, sample: ``trainer.vae_bridge.VAEBridge``'s interface)."""
    if name not in BASELINES:
        raise DataValidationError(
            source, "--baseline", f"unknown baseline {name!r}", f"use one of {BASELINES}"
        )
    if basal not in BASALS:
        raise DataValidationError(source, "--basal", f"unknown {basal!r}", f"use one of {BASALS}")
    if target_effect and name in ("control", "latent"):
        raise DataValidationError(
            source, "--target-effect", f"the {name!r} baseline takes no target effect",
            "use it with mean, additive or linear",
        )  # fmt: skip
    columns = (pert_col, control_label, cell_type_col, source, batch_col)
    if name == "latent":
        if bridge is None and not vae_run:
            raise DataValidationError(
                source, "--vae-run", "latent arithmetic needs a trained count VAE",
                "pass --vae-run VAE_RUN (trained with model.batch_conditioning=false)",
            )  # fmt: skip
        if bridge is None:
            from latentcell.inference.vae_bridge import VAEBridge

            bridge = VAEBridge(vae_run)
        data = _Training(train, bridge.genes(), *columns)
        return LatentArithmetic(bridge, data, basal)
    data = _Training(train, genes, *columns)
    symbols = gene_symbols or genes
    shifts = ContextShifts(data, data.x)
    factor = target_factor(data, symbols) if target_effect else None

    def build(kind: str):
        shift = _shift(kind, data, shifts, symbols, pert_col, n_components, ridge)
        base = data.control_mean if basal == "train" else None
        baseline = ShiftBaseline(kind, genes, shift, control_label, base)
        baseline.siblings = build  # the same fit's other shift baselines, for coincidence_note
        return baseline if factor is None else TargetEffect(baseline, symbols, factor)

    return build(name)


def _shift(name, data: _Training, shifts: ContextShifts, symbols, pert_col, n_components, ridge):
    """The ``(perturbation, cell type) -> shift`` function of shift baseline ``name``."""
    control_label, source = data.control_label, data.source
    if name == "control":
        zero = np.zeros(data.x.shape[1], dtype=np.float32)
        return lambda p, t: zero
    if name == "mean":
        cache: dict = {}
        labels = [p for p in data.labels if shifts.deltas[p]] or data.labels  # else: the error

        def mean(perturbation: str, cell_type: str) -> np.ndarray:
            if cell_type not in cache:
                cache[cell_type] = np.mean([shifts(p, cell_type) for p in labels], axis=0)
            return cache[cell_type]

        return mean
    singles = {}
    for label in data.labels:
        parts = split_genes(label, "+", control_label)
        if len(parts) == 1 and shifts.deltas[label]:
            singles[parts[0]] = label
    if name == "additive":

        def additive(perturbation: str, cell_type: str) -> np.ndarray:
            parts = split_genes(perturbation, "+", control_label)
            missing = [g for g in parts if g not in singles]
            if missing:
                raise DataValidationError(
                    source, pert_col, f"no training cells perturbing {missing}",
                    "the additive baseline needs every gene's single perturbation in training",
                )  # fmt: skip
            return np.sum([shifts(singles[g], cell_type) for g in parts], axis=0)

        return additive
    return _linear(data, shifts, symbols, singles, n_components, ridge)


def _linear(data, shifts: ContextShifts, symbols, singles, n_components, ridge):
    """Ridge on PCA embeddings (after Ahlmann-Eltze, Huber & Anders 2025, their linear model).

    A perturbation's embedding is its target gene's PCA loadings when the target is measured
    (so unseen measured targets can be predicted), else, for a perturbation seen in training,
    its training response projected on the same components (their "training data"
    embedding). One W is fitted over both kinds on the pooled (held-out type) shifts: a
    pragmatic mix, stated in the results. The offset b(t) is the cell type's mean shift.
    """
    from sklearn.utils.extmath import randomized_svd

    control_label, source = data.control_label, data.source
    centred = data.x - data.x.mean(0)
    k = min(n_components, min(centred.shape) - 1)
    _, _, vt = randomized_svd(centred, k, random_state=0)
    G = vt.T  # genes x k: each gene's embedding
    index = {g: i for i, g in enumerate(symbols)}
    seen = list(singles)
    if not seen:
        raise DataValidationError(
            source, "perturbation", "no single-gene training perturbation to fit on",
            "the linear baseline is fitted on single-gene perturbations' shifts",
        )  # fmt: skip
    Y = np.stack([shifts(singles[g], None) for g in seen], axis=1)  # genes x perturbations
    b = Y.mean(axis=1, keepdims=True)

    def embed(gene: str) -> np.ndarray:
        if gene in index:
            return G[index[gene]]
        if gene in singles:
            return G.T @ (Y[:, seen.index(gene)] - b[:, 0])
        raise DataValidationError(
            source, "var", f"target gene {gene!r} is neither measured nor seen in training",
            "the linear baseline embeds a perturbation by its measured target or its "
            "training response",
        )  # fmt: skip

    P = np.stack([embed(g) for g in seen])  # perturbations x k
    lhs = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ (Y - b))
    W = np.linalg.solve(P.T @ P + ridge * np.eye(k), (lhs @ P).T).T  # k x k
    offsets: dict = {}

    def linear(perturbation: str, cell_type: str) -> np.ndarray:
        parts = split_genes(perturbation, "+", control_label)
        emb = np.sum([embed(g) for g in parts], axis=0)
        if cell_type not in offsets:
            offsets[cell_type] = np.mean([shifts(singles[g], cell_type) for g in seen], axis=0)
        return (G @ W @ emb + offsets[cell_type]).astype(np.float32)

    return linear


# ---------------------------------------------------------------- coincident baselines


def _prediction_key(predictor) -> tuple | None:
    """What besides the shift decides a shift baseline's predictions (None: not one)."""
    inner = predictor.inner if isinstance(predictor, TargetEffect) else predictor
    if not isinstance(inner, ShiftBaseline):
        return None
    factor = predictor.factor if isinstance(predictor, TargetEffect) else None
    return (factor, inner._basal_mean is not None)


def _shift_table(predictor, perturbations, cell_types) -> np.ndarray | None:
    """Every requested (perturbation, cell type) shift stacked; None when one cannot be made."""
    inner = predictor.inner if isinstance(predictor, TargetEffect) else predictor
    try:
        return np.stack([inner.shift(p, t) for p in perturbations for t in cell_types])
    except DataValidationError:
        return None


def coincident_groups(
    predictors: Mapping[str, object], perturbations: Sequence[str], cell_types: Sequence[str]
) -> list[list[str]]:
    """Groups (of two or more names) of the shift baselines among ``predictors`` whose
    predictions are identical for every requested (perturbation, cell type): equal shifts,
    target effect and basal. Other predictors are ignored."""
    perturbations = list(perturbations)
    cell_types = list(cell_types) or [""]
    groups: list[tuple[tuple, np.ndarray, list[str]]] = []
    for name, predictor in predictors.items():
        key = _prediction_key(predictor)
        table = None if key is None else _shift_table(predictor, perturbations, cell_types)
        if table is None:
            continue
        for other_key, other, names in groups:
            if other_key == key and np.allclose(other, table, rtol=1e-5, atol=1e-6):
                names.append(name)
                break
        else:
            groups.append((key, table, [name]))
    return [names for _, _, names in groups if len(names) > 1]


def coincidence_note(predictor, pred: ad.AnnData, request) -> str | None:
    """One line naming the other shift baselines that would predict the same cells as
    ``predictor`` (a fitted shift baseline) for ``request``'s perturbations and the cell types
    of the prediction file ``pred``; None when there are none, or for any other predictor."""
    inner = predictor.inner if isinstance(predictor, TargetEffect) else predictor
    if _prediction_key(predictor) is None or not inner.siblings:
        return None
    column = request.cell_type_col
    cell_types = (
        sorted(set(pred.obs[column].astype(str))) if column and column in pred.obs else [""]
    )
    candidates = {inner.name: predictor}
    for kind in SHIFT_BASELINES:
        if kind != inner.name:
            try:
                candidates[kind] = inner.siblings(kind)
            except DataValidationError:  # e.g. linear with no single-gene perturbation
                continue
    for names in coincident_groups(candidates, request.perturbations, cell_types):
        if inner.name in names:
            others = ", ".join(n for n in names if n != inner.name)
            return (
                f"note: --baseline {inner.name} predicts the same cells as {others} for these "
                "perturbations (identical shifts; e.g. one training perturbation): report "
                "them as one baseline"
            )
    return None
