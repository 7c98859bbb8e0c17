"""The honest baselines for perturbation prediction, fitted on TRAINING cells only.

Each maps control cells (log1p-normalized, the model's genes) to predicted cells by adding a
per-gene shift, so predictions keep the controls' cell-to-cell variation (constant cells
would break cell-eval's Mann-Whitney DE); all go through ``trainer.predict``'s one path.

- ``control``: the control cells themselves (no effect).
- ``mean``: the training cell-mean: the mean shift of ALL perturbed training cells from the
  training controls (per cell type where it was seen), the same for every perturbation.
- ``additive``: each gene's own training shift; a combination ``A+B`` gets d_A + d_B. For a
  perturbation seen in training this is its training mean shift (the "perturbation mean").
- ``latent``: latent arithmetic (scGen): z_ctrl + mean(z_pert) - mean(z_ctrl) in the count
  VAE's latent space (per cell type where seen), decoded to mean expression.
- ``linear``: Ahlmann-Eltze et al. 2025: shifts Y (genes x perturbations) ~ G W P^T + b, with
  G the top-K PCA gene loadings of the training expression and P the perturbations'
  embeddings: the row of G of a measured target (so unseen measured targets can be
  predicted, zero-shot), else a seen perturbation's training response projected on G.

``target_effect=True`` (any but ``control`` and ``latent``; named ``NAME+target``): the
perturbed genes' own predicted expression is then multiplied by one factor, the median over
the measured training targets of (their mean log1p expression in their own perturbation) /
(in the training controls): the same prior as the ST model's ``target_effect``, so that a
model with it is compared with baselines that have it too.

``basal="train"`` (as the ST model's option): the given controls are first re-centred on the
training controls' mean (per cell type), so the baselines and an ST trained with
``model.basal=train`` start from the same cells; ``"set"`` uses the controls as given.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.models.perturbation_encoders import split_genes, target_columns
from latentcell.trainer.predict import _dense, _gene_matrix, log1p_normalize

__all__ = ["BASELINES", "ShiftBaseline", "TargetEffect", "fit_baseline", "target_factor"]

BASELINES = ("control", "mean", "additive", "linear", "latent")


BASALS = ("set", "train")


def recentre(control: np.ndarray, basal_mean: np.ndarray) -> np.ndarray:
    """The controls' own variation around ``basal_mean`` (their mean replaced by it)."""
    return control - control.mean(0, keepdims=True) + basal_mean[None]


class ShiftBaseline:
    """Prediction = control + shift(perturbation, cell type), clipped at 0; with
    ``basal_mean`` (cell type -> mean) the controls are re-centred on it first."""

    def __init__(self, name: str, genes: list[str], shift, control_label: str, basal_mean=None):
        self.name, self.genes, self._shift, self.control_label = name, genes, shift, control_label
        self._basal_mean = basal_mean

    def predict(self, control, perturbation: str, cell_type: str, library=None, rng=None):
        if self._basal_mean is not None:
            control = np.clip(recentre(control, self._basal_mean(cell_type)), 0, None)
        if perturbation == self.control_label:
            return control
        return np.clip(control + self._shift(perturbation, cell_type)[None], 0, None)


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
    """Median over measured single-gene training targets of mean log1p(target | its
    perturbation) / mean log1p(target | controls); targets unexpressed in controls skipped."""
    index = {g: i for i, g in enumerate(symbols)}
    control = data.control_mean()
    ratios = []
    for label in pd.unique(data.pert[~data.is_control]):
        columns = target_columns(label, index, "+", data.control_label)
        if len(split_genes(label, "+", data.control_label)) == 1 and columns:
            g = columns[0]
            if control[g] > 0:
                ratios.append(data.x[data.pert == label, g].mean() / control[g])
    if not ratios:
        raise DataValidationError(
            data.source, "perturbation",
            "no single-gene training perturbation targets a measured gene expressed in the "
            "controls, so the target effect cannot be fitted",
            "drop target_effect (--target-effect), or train on measured targets",
        )  # fmt: skip
    return float(np.median(ratios))


class LatentArithmetic:
    """scGen's latent arithmetic on the count VAE: z + mean(z | perturbation, cell type) -
    mean(z | control, cell type), pooled over cell types where the pair was not seen."""

    name = "latent"

    def __init__(self, bridge, data: _Training, basal: str = "set") -> None:
        self.bridge, self.genes, self.control_label = bridge, bridge.genes(), data.control_label
        z = bridge.encode_numpy(data.x)
        self._z, self._data, self._basal = z, data, basal
        self.source = data.source

    def _mean(self, rows: np.ndarray) -> np.ndarray:
        return self._z[rows].mean(0)

    def predict(self, control, perturbation: str, cell_type: str, library=None, rng=None):
        """Decoded cells: sampled from the VAE's likelihood when ``library`` and ``rng`` are
        given (the prediction path), else the decoder's mean."""
        z = self.bridge.encode_numpy(control)
        if self._basal == "train":  # in the latent space the arithmetic works in
            z = recentre(z, self._mean(self._data.control_rows(cell_type)))
        if perturbation == self.control_label and self._basal == "set":
            return control
        if perturbation == self.control_label:
            return self._decode(z, library, rng)
        d = self._data
        pert = d.pert == perturbation
        if not pert.any():
            raise DataValidationError(
                self.source, "perturbation", f"no training cells of {perturbation!r}",
                "latent arithmetic can only predict perturbations seen in training",
            )  # fmt: skip
        in_type = d.cell_type == cell_type
        both = pert & in_type if (pert & in_type).any() else pert
        shift = self._mean(both) - self._mean(self._data.control_rows(cell_type))
        return self._decode(z + shift, library, rng)

    def _decode(self, z: np.ndarray, library, rng) -> np.ndarray:
        if library is None or rng is None:
            return self.bridge.decode_numpy(z)
        return self.bridge.sample(z, library, rng)


class _Training:
    """Training cells in log1p on the model's genes, grouped by (cell type, perturbation)."""

    def __init__(self, train: ad.AnnData, genes, pert_col, control_label, cell_type_col, source):
        for column in (pert_col,):
            if column not in train.obs:
                raise DataValidationError(
                    source, column, "missing obs column", f"pass a training file with {column}"
                )
        counts = _dense(train.X)
        self.x = log1p_normalize(counts[:, _gene_matrix(train, genes, source)], counts.sum(1))
        self.pert = train.obs[pert_col].astype(str).to_numpy()
        self.cell_type = (
            train.obs[cell_type_col].astype(str).to_numpy()
            if cell_type_col and cell_type_col in train.obs
            else np.full(train.n_obs, "")
        )
        self.control_label, self.source = control_label, source
        self.is_control = self.pert == control_label
        if not self.is_control.any():
            raise DataValidationError(
                source, pert_col, f"no {control_label!r} cells", "include the training controls"
            )

    def control_rows(self, cell_type: str | None = None) -> np.ndarray:
        """The training controls of ``cell_type`` (all controls where it has none)."""
        rows = self.is_control & ((self.cell_type == cell_type) if cell_type else True)
        return rows if rows.any() else self.is_control

    def control_mean(self, cell_type: str | None = None) -> np.ndarray:
        return self.x[self.control_rows(cell_type)].mean(0)

    def shift(self, rows: np.ndarray, cell_type: str | None = None) -> np.ndarray:
        return self.x[rows].mean(0) - self.control_mean(cell_type)

    def gene_shifts(self) -> dict[str, np.ndarray]:
        """Pooled-over-cell-types shift of every single-gene perturbation."""
        out = {}
        for label in pd.unique(self.pert[~self.is_control]):
            genes = split_genes(label, "+", self.control_label)
            if len(genes) == 1:
                out[genes[0]] = self.shift(self.pert == label)
        return out


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
) -> ShiftBaseline | LatentArithmetic | TargetEffect:
    """Fit baseline ``name`` on ``train`` (counts) over ``genes`` (the model's gene keys);
    ``gene_symbols`` name the same genes as perturbation labels do (default: the keys)."""
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
    if name == "latent":
        if not vae_run:
            raise DataValidationError(
                source, "--vae-run", "latent arithmetic needs a trained count VAE",
                "pass --vae-run VAE_RUN (trained with model.batch_conditioning=false)",
            )  # fmt: skip
        from latentcell.trainer.vae_bridge import VAEBridge

        bridge = VAEBridge(vae_run)
        data = _Training(train, bridge.genes(), pert_col, control_label, cell_type_col, source)
        return LatentArithmetic(bridge, data, basal)
    data = _Training(train, genes, pert_col, control_label, cell_type_col, source)
    symbols = gene_symbols or genes
    shift = _shift(name, data, symbols, pert_col, n_components, ridge)
    base = data.control_mean if basal == "train" else None
    baseline = ShiftBaseline(name, genes, shift, control_label, base)
    if target_effect:
        return TargetEffect(baseline, symbols, target_factor(data, symbols))
    return baseline


def _shift(name: str, data: _Training, symbols, pert_col: str, n_components: int, ridge: float):
    """The ``(perturbation, cell type) -> shift`` function of shift baseline ``name``."""
    control_label, source = data.control_label, data.source
    if name == "control":
        zero = np.zeros(data.x.shape[1], dtype=np.float32)
        return lambda p, t: zero
    if name == "mean":
        per_type = {
            t: data.shift(~data.is_control & (data.cell_type == t), t)
            for t in pd.unique(data.cell_type[~data.is_control])
        }
        pooled = data.shift(~data.is_control)
        return lambda p, t: per_type.get(t, pooled)
    singles = data.gene_shifts()
    if name == "additive":

        def additive(perturbation: str, cell_type: str) -> np.ndarray:
            parts = split_genes(perturbation, "+", control_label)
            missing = [g for g in parts if g not in singles]
            if missing:
                raise DataValidationError(
                    source, pert_col, f"no training cells perturbing {missing}",
                    "the additive baseline needs every gene's single perturbation in training",
                )  # fmt: skip
            return np.sum([singles[g] for g in parts], axis=0)

        return additive
    return _linear(data, symbols, singles, control_label, source, n_components, ridge)


def _linear(data, symbols, singles, control_label, source, n_components, ridge):
    """Ridge on PCA embeddings (after Ahlmann-Eltze, Huber & Anders 2025, their linear model).

    A perturbation's embedding is its target gene's PCA loadings when the target is measured
    (so unseen measured targets can be predicted), else, for a perturbation seen in training,
    its training response projected on the same components (their "training data"
    embedding). One W is fitted over both kinds: a pragmatic mix, stated in the results.
    """
    from sklearn.utils.extmath import randomized_svd

    centred = data.x - data.x.mean(0)
    k = min(n_components, min(centred.shape) - 1)
    _, _, vt = randomized_svd(centred, k, random_state=0)
    G = vt.T  # genes x k: each gene's embedding
    index = {g: i for i, g in enumerate(symbols)}
    seen = list(singles)
    Y = np.stack([singles[g] for g in seen], axis=1)  # genes x perturbations
    b = Y.mean(axis=1, keepdims=True)

    def embed(gene: str) -> np.ndarray:
        if gene in index:
            return G[index[gene]]
        if gene in singles:
            return G.T @ (singles[gene] - b[:, 0])
        raise DataValidationError(
            source, "var", f"target gene {gene!r} is neither measured nor seen in training",
            "the linear baseline embeds a perturbation by its measured target or its "
            "training response",
        )  # fmt: skip

    P = np.stack([embed(g) for g in seen])  # perturbations x k
    lhs = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ (Y - b))
    W = np.linalg.solve(P.T @ P + ridge * np.eye(k), (lhs @ P).T).T  # k x k

    def linear(perturbation: str, cell_type: str) -> np.ndarray:
        parts = split_genes(perturbation, "+", control_label)
        emb = np.sum([embed(g) for g in parts], axis=0)
        return (G @ W @ emb + b[:, 0]).astype(np.float32)

    return linear
