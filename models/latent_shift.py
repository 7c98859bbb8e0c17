"""Latent-shift predictors: a control cell's embedding + a perturbation descriptor -> the
embedding of that cell perturbed, decoded back to genes by a frozen decoder.

    control log1p --embed--> ctrl_emb --predictor(ctrl_emb, descriptor)--> pert_emb --decode-->

The embedding (PCA of log1p expression, or a count VAE's posterior mean) and its decoder are
fixed before the predictor sees any data, so a predictor is a plain regression on small
dense arrays. That is the point of the family: any regression model (an MLP, ridge, a
gradient-boosted tree, a foundation model's head) becomes a perturbation model by
implementing four numpy methods, with no torch, no loop and no store handling
(``PerturbationPredictor``). Training cells are unpaired (a perturbed cell has no "own"
control), so the stage pairs each perturbed cell with a control of its (cell type, batch)
by a configured rule (``trainer/latent_shift_stage.py``).

Descriptors (``Descriptors``): ``onehot`` (one column per trained perturbation label),
``gene_table`` (multi-hot over the perturbed genes: a predictor's first linear layer on it is
a learned gene table, so ``A+B`` is e_A + e_B as in ``models/perturbation_encoders.py``), or
``external`` (fixed gene vectors summed per label, read from the ST's embedding-file formats
by ``load_gene_vectors``; unseen perturbations of genes in the file can be predicted).

Persistence is part of the protocol: ``get_state() -> dict[str, np.ndarray]`` and
``set_state(state)`` on a fresh instance (built with no arguments) must reproduce
``predict`` exactly. Runs save that dict as ``.npz`` loaded with ``allow_pickle=False``:
never pickle, so loading a run cannot execute code beyond importing the predictor's class.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from latentcell.data_pipelines.errors import DataValidationError

from .perturbation_labels import perturbation_genes, split_genes

__all__ = [
    "DESCRIPTORS",
    "MODEL_CLASS",
    "ConditionalMLP",
    "Descriptors",
    "LatentShiftRun",
    "PCAEmbedding",
    "PerturbationPredictor",
    "make_predictor",
]

MODEL_CLASS = "latentcell.models.latent_shift.LatentShiftRun"
DESCRIPTORS = ("onehot", "gene_table", "external")
PROTOCOL_FIX = (
    "point it to a class importable as pkg.module:Class whose no-argument instances have "
    "train(ctrl_emb, pert_emb, pert_cov, **kwargs), predict(ctrl_emb, pert_cov), "
    "get_state() -> dict[str, np.ndarray] and set_state(state) "
    "(latentcell.models.latent_shift.PerturbationPredictor)"
)


@runtime_checkable
class PerturbationPredictor(Protocol):
    """What the latent-shift family needs from a model; all arrays are float32 numpy.

    ``train(ctrl_emb (n, d), pert_emb (n, d), pert_cov (n, k), **kwargs)``: row i pairs a
    control embedding with a perturbed cell's embedding and its perturbation's descriptor.
    kwargs are the run's options (``seed``, ``max_steps``, ``batch_size``, ``lr``,
    ``weight_decay``, ``hidden``, ``progress``: a callable(step, loss) or None): take what
    you use, ignore the rest. ``predict(ctrl_emb (n, d), pert_cov (n, k)) -> (n, d)``.
    ``get_state()``/``set_state(state)``: see the module docstring (a run is an .npz of the
    state; a fresh ``Class()`` plus ``set_state`` must predict identically)."""

    def train(
        self, ctrl_emb: np.ndarray, pert_emb: np.ndarray, pert_cov: np.ndarray, **kwargs: Any
    ) -> None: ...

    def predict(self, ctrl_emb: np.ndarray, pert_cov: np.ndarray) -> np.ndarray: ...

    def get_state(self) -> dict[str, np.ndarray]: ...

    def set_state(self, state: Mapping[str, np.ndarray]) -> None: ...


def make_predictor(reference: str, source: str = "latentcell train latent-shift"):
    """A fresh instance of the ``"pkg.module:Class"`` a run's ``model.predictor`` names,
    checked against the protocol: one error line naming ``model.predictor`` otherwise."""

    def fail(problem: str) -> DataValidationError:
        return DataValidationError(source, "model.predictor", problem, PROTOCOL_FIX)

    module, _, name = reference.partition(":")
    if not module or not name:
        raise fail(f"{reference!r} is not a 'pkg.module:Class' reference")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise fail(f"cannot import module {module!r} ({err})") from err
    except AttributeError:
        raise fail(f"module {module!r} has no attribute {name!r}") from None
    try:
        predictor = cls()
    except Exception as err:
        raise fail(f"{reference}() failed: {type(err).__name__}: {err}") from err
    missing = [m for m in ("train", "predict", "get_state", "set_state")
               if not callable(getattr(predictor, m, None))]  # fmt: skip
    if missing:
        raise fail(f"{reference} has no method {', '.join(missing)}")
    return predictor


def checked_state(state: Any, reference: str) -> dict[str, np.ndarray]:
    """``get_state()``'s result as plain arrays, refusing what .npz cannot hold without pickle."""
    if not isinstance(state, Mapping):
        raise DataValidationError(reference, "model.predictor", "get_state() returned "
                                  f"{type(state).__name__}, not a dict", PROTOCOL_FIX)  # fmt: skip
    out = {}
    for key, value in state.items():
        array = np.asarray(value)
        if not isinstance(key, str) or array.dtype == object:
            raise DataValidationError(
                reference, "model.predictor",
                f"get_state()[{key!r}] is not a numeric or string array", PROTOCOL_FIX,
            )  # fmt: skip
        out[key] = array
    return out


class ConditionalMLP:
    """The reference predictor: an MLP on [standardized ctrl_emb, descriptor] predicting the
    shift pert_emb - ctrl_emb (in units of its per-dimension spread), trained with MSE by
    AdamW on seeded minibatches. The last layer starts at zero, so an untrained model
    predicts "no effect" and training only has to learn what the perturbation changes.
    Torch inside, numpy outside, on one CPU thread: a (256, 128) matmul is too small for
    intra-op threads, which only add synchronization (300 steps: 0.3 s on one thread, 7.6 s
    on two of a loaded 2-core machine); the caller's thread setting is restored after."""

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = {}
        self._net = None

    def train(self, ctrl_emb, pert_emb, pert_cov, *, seed: int = 0, hidden=(128, 128),
              max_steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
              weight_decay: float = 0.0, progress=None, **_: Any) -> None:  # fmt: skip
        import torch

        ctrl, cov = np.asarray(ctrl_emb, np.float32), np.asarray(pert_cov, np.float32)
        shift = np.asarray(pert_emb, np.float32) - ctrl
        self._state = {
            "x_mean": ctrl.mean(0), "x_std": np.maximum(ctrl.std(0), 1e-6),
            "y_scale": np.maximum(shift.std(0), 1e-6),
        }  # fmt: skip
        generator = torch.Generator().manual_seed(int(seed))
        self._net = _mlp([ctrl.shape[1] + cov.shape[1], *hidden, ctrl.shape[1]], generator)
        x = torch.from_numpy(self._inputs(ctrl, cov))
        y = torch.from_numpy(shift / self._state["y_scale"])
        optimizer = torch.optim.AdamW(self._net.parameters(), lr=lr, weight_decay=weight_decay)
        with _one_thread():
            self._fit(x, y, optimizer, generator, int(max_steps), int(batch_size), progress)

    def _fit(self, x, y, optimizer, generator, max_steps, batch_size, progress) -> None:
        import torch

        for step in range(1, max_steps + 1):
            batch = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
            loss = torch.nn.functional.mse_loss(self._net(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(step, float(loss))

    def _inputs(self, ctrl: np.ndarray, cov: np.ndarray) -> np.ndarray:
        z = (ctrl - self._state["x_mean"]) / self._state["x_std"]
        return np.concatenate([z, cov], axis=1).astype(np.float32)

    def predict(self, ctrl_emb, pert_cov) -> np.ndarray:
        import torch

        ctrl = np.asarray(ctrl_emb, np.float32)
        with torch.no_grad(), _one_thread():
            out = self._net(torch.from_numpy(self._inputs(ctrl, np.asarray(pert_cov, np.float32))))
        return ctrl + out.numpy() * self._state["y_scale"]

    def get_state(self) -> dict[str, np.ndarray]:
        state = {k: v.copy() for k, v in self._state.items()}
        for i, linear in enumerate(self._linears()):
            for k, v in linear.state_dict().items():
                state[f"layer{i}.{k}"] = v.detach().numpy().copy()
        return state

    def set_state(self, state) -> None:
        import torch

        self._state = {k: np.asarray(state[k], np.float32) for k in ("x_mean", "x_std", "y_scale")}
        n = sum(1 for k in state if k.startswith("layer") and k.endswith(".weight"))
        sizes = [state["layer0.weight"].shape[1]]
        sizes += [state[f"layer{i}.weight"].shape[0] for i in range(n)]
        self._net = _mlp(sizes, torch.Generator())
        for i, m in enumerate(self._linears()):
            m.load_state_dict({k: torch.from_numpy(np.asarray(state[f"layer{i}.{k}"], np.float32))
                               for k in ("weight", "bias")})  # fmt: skip

    def _linears(self) -> list:
        import torch

        return [m for m in self._net if isinstance(m, torch.nn.Linear)]


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mlp(sizes: list[int], generator):
    """Linear/GELU stack; the last layer zero (predicts no shift until trained)."""
    import torch

    layers: list = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = torch.nn.Linear(a, b)
        with torch.no_grad():
            bound = a**-0.5
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.zero_()
            if i == len(sizes) - 2:
                linear.weight.zero_()
        layers += [linear] if i == len(sizes) - 2 else [linear, torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


@dataclass
class PCAEmbedding:
    """PCA of log1p expression: ``encode`` projects, ``decode`` inverts. ``mode="shift"``
    adds the decoded change (pred - ctrl) to the control's own expression, keeping what the
    top components drop (each cell's sparsity and noise); ``"full"`` returns the plain
    inverse. Both clip at 0, the floor of log1p expression."""

    mean: np.ndarray  # (G,)
    components: np.ndarray  # (d, G), orthonormal rows

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int, seed: int) -> PCAEmbedding:
        from sklearn.utils.extmath import randomized_svd

        mean = x.mean(0)
        k = max(1, min(n_components, *x.shape))
        _, _, vt = randomized_svd(x - mean, k, random_state=seed)
        return cls(mean.astype(np.float32), vt.astype(np.float32))

    def encode(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T).astype(np.float32)

    def decode(self, pred: np.ndarray, ctrl_emb: np.ndarray, control: np.ndarray, mode: str):
        if mode == "full":
            out = pred @ self.components + self.mean
        else:
            out = control + (pred - ctrl_emb) @ self.components
        return np.clip(out, 0, None).astype(np.float32)


@dataclass
class Descriptors:
    """Perturbation label -> descriptor row: the sum of the vectors of its ``keys`` (the
    label itself for ``onehot``, its genes otherwise); the control's row is zero."""

    kind: str
    keys: list[str]
    vectors: np.ndarray  # (len(keys), k)
    control_label: str
    separator: str = "+"

    @classmethod
    def build(cls, kind: str, labels: list[str], control_label: str, file: str = ""):
        """From the store's perturbation vocabulary (all labels, trained or not)."""
        from .perturbation_encoders import load_gene_vectors

        if kind == "onehot":
            keys = [x for x in labels if x != control_label]
        else:
            keys = list(perturbation_genes(labels, "+", control_label))
        if kind == "external":
            vectors = load_gene_vectors(file, keys, control_label).numpy()
        else:
            vectors = np.eye(len(keys), dtype=np.float32)
        return cls(kind, keys, vectors.astype(np.float32), control_label)

    def parts(self, label: str) -> tuple[str, ...]:
        if self.kind == "onehot":
            return () if label == self.control_label else (label,)
        return split_genes(label, self.separator, self.control_label)

    def matrix(self, labels) -> np.ndarray:
        """(len(labels), k); a label with a part outside ``keys`` is one error line."""
        index = {k: i for i, k in enumerate(self.keys)}
        rows = {}
        for label in dict.fromkeys(labels):
            unknown = [p for p in self.parts(label) if p not in index]
            if unknown:
                raise DataValidationError(
                    "--perturbations", label,
                    f"the run's {self.kind} descriptors have no entry for {unknown}",
                    "predict perturbations of the run's store (descriptor=external embeds "
                    "any gene of its vocabulary)",
                )  # fmt: skip
            rows[label] = self.vectors[[index[p] for p in self.parts(label)]].sum(0)
        return np.stack([rows[x] for x in labels]).astype(np.float32)


@dataclass
class LatentShiftRun:
    """A trained run: its predictor, descriptors and PCA (None for a VAE embedding, whose
    weights stay in the VAE run). ``final/`` holds ``predictor.npz`` (the predictor's state)
    and ``latent_shift.npz`` (PCA mean/components, descriptor vectors) beside the model card,
    whose ``class`` is this class's path (``MODEL_CLASS``)."""

    predictor: Any
    descriptors: Descriptors
    pca: PCAEmbedding | None = None
    PREDICTOR_FILE = "predictor.npz"
    ARRAYS_FILE = "latent_shift.npz"

    def shift(self, ctrl_emb: np.ndarray, perturbation: str) -> np.ndarray:
        cov = np.repeat(self.descriptors.matrix([perturbation]), len(ctrl_emb), axis=0)
        return np.asarray(self.predictor.predict(ctrl_emb, cov), dtype=np.float32)

    def save(self, final_dir: Path, reference: str) -> None:
        arrays = {"descriptor_vectors": self.descriptors.vectors}
        if self.pca is not None:
            arrays |= {"pca_mean": self.pca.mean, "pca_components": self.pca.components}
        _savez(final_dir / self.ARRAYS_FILE, arrays)
        _savez(
            final_dir / self.PREDICTOR_FILE, checked_state(self.predictor.get_state(), reference)
        )

    @classmethod
    def load(cls, final_dir: Path, card: dict) -> LatentShiftRun:
        """From ``final/`` and its model card (``inference/latent_shift_predictor.py``)."""
        predictor = make_predictor(card["predictor"], str(final_dir / "model_config.json"))
        with np.load(final_dir / cls.PREDICTOR_FILE, allow_pickle=False) as f:
            predictor.set_state({k: f[k] for k in f.files})
        with np.load(final_dir / cls.ARRAYS_FILE, allow_pickle=False) as f:
            d = card["descriptors"]
            descriptors = Descriptors(d["kind"], list(d["keys"]), f["descriptor_vectors"],
                                      card["control_label"])  # fmt: skip
            pca = PCAEmbedding(f["pca_mean"], f["pca_components"]) if "pca_mean" in f else None
        return cls(predictor, descriptors, pca)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
