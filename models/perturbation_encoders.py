"""Perturbation encoders: a perturbation code -> the vector a set transformer conditions on.

An ST-style model (Arc STATE) predicts the perturbed population from control cells plus one
embedding of the perturbation. Labels come from a store's perturbation column (e.g.
``target_gene``): the control (``non-targeting``), single genes (``STAT1``) and combinations
(``STAT1+IRF1``, separator ``combo_separator``). Every encoder maps int64 codes (B,), which
index a fixed label vocabulary ``encoder.labels``, to float (B, dim):

- ``onehot``: one learned vector per label. This is one-hot (B, V) times a bias-free
  Linear(V, dim), stored as a lookup table, so the output width is ``dim`` for every kind and
  the downstream model never depends on the vocabulary size. A combination is just another
  label; a label outside the vocabulary cannot be embedded.
- ``gene_table``: one learned vector per gene; a label is the sum of its genes' vectors
  (multi-hot), so ``A+B`` = e_A + e_B and a combination never seen as a label embeds as soon
  as its genes are known. The control has no genes, so its vector is exactly zero.
- ``external``: fixed gene vectors from a file (ESM2, GenePT, ...), summed per label like
  ``gene_table``, then a learned Linear to ``dim``. A gene without a vector in the file is an
  error at construction, never a silent zero vector: zero means "control", and Arc's
  cell-load shipped exactly that bug.

Gene parsing (``split_genes``): a label is split on the separator, pieces are stripped, and
pieces equal to the control label are dropped (GEARS/Norman write singles as ``STAT1+ctrl``),
duplicates count once (multi-hot). ``A+B`` and ``B+A`` embed identically. Gene names match
the embeddings file exactly (case-sensitive).

Unseen labels at predict time: ``encoder.encode(names)`` only looks labels up and raises
DataValidationError for unknown ones. ``encoder.extend(names)`` also appends new labels to
the vocabulary when every one of their genes is known (gene_table, external) and returns
their codes; for onehot it is the same as ``encode``.

Save/reload: ``config`` + ``labels`` + ``state_dict()`` rebuild any encoder through
``make_perturbation_encoder(config, labels, state_dict=sd)``. The external vectors are a
persistent buffer (saved in the state dict, never trained), so reloading does not read the
file. Labels added by ``extend`` add no gene and no state: rebuilding from the original labels
(and extending again) or from the extended labels gives the same outputs.
"""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentcell.data_pipelines.errors import DataValidationError

from .perturbation_labels import _VOCAB, perturbation_genes, split_genes, target_columns

__all__ = [
    "ENCODER_CLASSES",
    "ENCODER_KINDS",
    "ExternalGeneEncoder",
    "GeneTableEncoder",
    "OneHotEncoder",
    "PerturbationEncoder",
    "PerturbationEncoderConfig",
    "encode_labels",
    "load_gene_vectors",
    "make_perturbation_encoder",
    "perturbation_genes",
    "split_genes",
    "target_columns",
]

ENCODER_KINDS = ("onehot", "gene_table", "external")


@dataclass(frozen=True)
class PerturbationEncoderConfig:
    kind: Literal["onehot", "gene_table", "external"] = "onehot"
    dim: int = 128
    embeddings_file: str = ""  # external only: .csv/.tsv(.gz), .npz or .pt, gene -> vector
    combo_separator: str = "+"
    control_label: str = "non-targeting"

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        if int(self.dim) < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        object.__setattr__(self, "dim", int(self.dim))
        if self.kind == "external" and not self.embeddings_file:
            raise ValueError("kind='external' needs embeddings_file (gene -> vector file)")
        if self.kind != "external" and self.embeddings_file:
            raise ValueError(f"embeddings_file is only read by kind='external', not {self.kind!r}")
        if not self.combo_separator.strip():
            raise ValueError("combo_separator must be a non-blank string such as '+'")
        if not self.control_label.strip() or self.combo_separator in self.control_label:
            raise ValueError(
                f"control_label {self.control_label!r} must be non-blank and not contain "
                f"combo_separator {self.combo_separator!r}"
            )


def _preview(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _duplicates(names: Sequence[str]) -> list[str]:
    return [name for name, n in Counter(names).items() if n > 1]


def _check_vocabulary(labels: Sequence[str]) -> tuple[str, ...]:
    labels = () if isinstance(labels, str) else tuple(labels)  # a bare str is a mistake
    if not labels or not all(isinstance(s, str) and s.strip() for s in labels):
        raise DataValidationError(
            _VOCAB,
            "labels",
            "the vocabulary must be a non-empty list of non-empty strings",
            "pass the store's perturbation categories as a list",
        )
    if dups := _duplicates(labels):
        raise DataValidationError(
            _VOCAB, "labels", f"labels listed twice: {_preview(dups)}", "list each label once"
        )
    return labels


def encode_labels(labels: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """int64 codes of ``names`` in the vocabulary ``labels``; unknown names are an error.

    Used at predict time, where a silently wrong code would predict the wrong perturbation.
    """
    if isinstance(names, str):
        names = [names]
    code = {label: i for i, label in enumerate(labels)}
    unknown = list(dict.fromkeys(n for n in names if n not in code))
    if unknown:
        raise DataValidationError(
            _VOCAB,
            "perturbation",
            f"{len(unknown)} label(s) not in the model's vocabulary of {len(code)}: "
            f"{_preview(unknown)}",
            f"use labels the model was built with (e.g. {_preview(list(labels), 3)}); "
            "gene_table and external encoders also embed new combinations of known genes "
            "through encoder.extend(names)",
        )
    return torch.tensor([code[n] for n in names], dtype=torch.long)


class PerturbationEncoder(nn.Module):
    """``forward(codes (B,) int64) -> (B, dim)``; ``labels`` is the code vocabulary.
    ``VOCABULARY_AXES`` / ``DERIVED_TENSORS``: as ``STModel``'s, for the encoder's tensors
    ("perturbation": the labels; "perturbation_gene": the genes of a gene-sum encoder)."""

    VOCABULARY_AXES: tuple[tuple[str, int, str], ...] = ()
    DERIVED_TENSORS: tuple[str, ...] = ()

    def __init__(self, config: PerturbationEncoderConfig, labels: Sequence[str]) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.labels = _check_vocabulary(labels)

    def _device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """Codes of known labels (on the encoder's device); unknown labels raise."""
        return encode_labels(self.labels, names).to(self._device())

    def extend(self, names: Sequence[str]) -> torch.Tensor:
        """Codes of ``names``, appending new labels the encoder can embed. One-hot: none."""
        return self.encode(names)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """The input of the learned map: one-hot, multi-hot or summed external vectors."""
        raise NotImplementedError


class OneHotEncoder(PerturbationEncoder):
    """One learned vector per label (one-hot times a bias-free Linear, as a lookup)."""

    VOCABULARY_AXES = (("table.weight", 0, "perturbation"),)

    def __init__(self, config: PerturbationEncoderConfig, labels: Sequence[str]) -> None:
        super().__init__(config, labels)
        self.table = nn.Embedding(len(self.labels), config.dim)
        # std 1/sqrt(dim): each label's vector has about unit norm, like the one-hot it replaces.
        nn.init.normal_(self.table.weight, std=config.dim**-0.5)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        return F.one_hot(codes, len(self.labels)).to(self.table.weight.dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table(codes)


class _GeneSumEncoder(PerturbationEncoder):
    """A label is the sum of per-gene vectors; ``gene_index`` (L, K) lists each label's genes.

    ``gene_index`` is padded with ``len(genes)``, the index of an appended zero row, so a sum
    over K rows adds exact zeros and ``A+B`` is bit-for-bit e_A + e_B. It is derived from the
    labels, hence not saved (``persistent=False``).
    """

    source = _VOCAB  # the file named by errors about unknown genes

    def __init__(self, config: PerturbationEncoderConfig, labels: Sequence[str]) -> None:
        super().__init__(config, labels)
        sep, control = config.combo_separator, config.control_label
        self._label_genes = [split_genes(s, sep, control) for s in self.labels]
        self.genes = perturbation_genes(self.labels, sep, control)
        if not self.genes:
            raise DataValidationError(
                _VOCAB,
                "labels",
                f"no label names a gene (only the control {control!r})",
                "build the encoder from the store's perturbation labels",
            )
        self._gene_code = {g: i for i, g in enumerate(self.genes)}
        self.register_buffer("gene_index", self._index(), persistent=False)

    def _index(self) -> torch.Tensor:
        pad = len(self.genes)
        width = max(1, *(len(gs) for gs in self._label_genes))
        rows = [
            [self._gene_code[g] for g in gs] + [pad] * (width - len(gs)) for gs in self._label_genes
        ]
        return torch.tensor(rows, dtype=torch.long)

    def _sum(self, table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([table, table.new_zeros(1, table.shape[1])])
        return padded[self.gene_index[codes]].sum(-2)

    def extend(self, names: Sequence[str]) -> torch.Tensor:
        """Codes of ``names``; a new label is appended when all its genes are known.

        Known genes are those of the vocabulary the encoder was built with: they are the only
        ones with a trained (gene_table) or stored (external) vector.
        """
        if isinstance(names, str):
            names = [names]
        known = set(self.labels)
        new = [n for n in dict.fromkeys(names) if n not in known]
        sep, control = self.config.combo_separator, self.config.control_label
        parsed = [split_genes(n, sep, control) for n in new]
        unknown = list(dict.fromkeys(g for gs in parsed for g in gs if g not in self._gene_code))
        if unknown:
            raise DataValidationError(
                self.source,
                "perturbation",
                f"{len(unknown)} gene(s) unknown to this {self.config.kind} encoder: "
                f"{_preview(unknown)}",
                self._unknown_gene_fix(),
            )
        if new:
            self.labels = self.labels + tuple(new)
            self._label_genes += parsed
            self.gene_index = self._index().to(self.gene_index.device)
        return self.encode(names)

    def _unknown_gene_fix(self) -> str:
        raise NotImplementedError

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """Multi-hot (B, n_genes): 1 for each gene a label perturbs."""
        hot = F.one_hot(self.gene_index[codes], len(self.genes) + 1).sum(-2)
        return hot[..., : len(self.genes)].float()


class GeneTableEncoder(_GeneSumEncoder):
    """One learned vector per gene; a label is the sum of its genes' vectors."""

    VOCABULARY_AXES = (("table.weight", 0, "perturbation_gene"),)

    def __init__(self, config: PerturbationEncoderConfig, labels: Sequence[str]) -> None:
        super().__init__(config, labels)
        self.table = nn.Embedding(len(self.genes), config.dim)
        nn.init.normal_(self.table.weight, std=config.dim**-0.5)  # see OneHotEncoder

    def _unknown_gene_fix(self) -> str:
        return (
            "a gene_table encoder only has vectors for genes it was trained on; use "
            "kind='external' with a file that has a vector for these genes"
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self._sum(self.table.weight, codes)


class ExternalGeneEncoder(_GeneSumEncoder):
    """Fixed gene vectors (buffer ``gene_vectors``, rows aligned with ``genes``), summed per
    label, then a learned ``projection`` to ``dim``. ``features`` is the sum before it."""

    DERIVED_TENSORS = ("gene_vectors",)  # this model's own file's vectors, never copied

    def __init__(
        self,
        config: PerturbationEncoderConfig,
        labels: Sequence[str],
        vectors: torch.Tensor,
    ) -> None:
        super().__init__(config, labels)
        self.source = config.embeddings_file
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(self.genes) or vectors.shape[1] < 1:
            raise ValueError(
                f"vectors must be ({len(self.genes)}, d) rows aligned with .genes, "
                f"got {tuple(vectors.shape)}"
            )
        self.register_buffer("gene_vectors", vectors.detach().clone())
        self.projection = nn.Linear(vectors.shape[1], config.dim)

    def _unknown_gene_fix(self) -> str:
        return (
            "an external encoder stores only the vectors of the genes in the vocabulary it was "
            "built with; rebuild it with labels naming these genes (the file must have their "
            "vectors) and retrain"
        )

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        return self._sum(self.gene_vectors, codes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(codes).to(self.projection.weight.dtype))


# The class of each kind, for reading a kind's declarations without building an encoder.
ENCODER_CLASSES: dict[str, type[PerturbationEncoder]] = {
    "onehot": OneHotEncoder,
    "gene_table": GeneTableEncoder,
    "external": ExternalGeneEncoder,
}


def make_perturbation_encoder(
    config: PerturbationEncoderConfig,
    labels: Sequence[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> PerturbationEncoder:
    """The encoder ``config.kind`` over the vocabulary ``labels``.

    With ``state_dict`` (a saved ``encoder.state_dict()``) the weights are loaded and an
    external encoder takes its vectors from it instead of reading ``embeddings_file``.
    """
    if config.kind == "onehot":
        encoder: PerturbationEncoder = OneHotEncoder(config, labels)
    elif config.kind == "gene_table":
        encoder = GeneTableEncoder(config, labels)
    elif state_dict is not None:
        if "gene_vectors" not in state_dict:
            raise KeyError("state_dict has no 'gene_vectors': not an external encoder's state")
        encoder = ExternalGeneEncoder(config, labels, state_dict["gene_vectors"])
    else:
        genes = perturbation_genes(labels, config.combo_separator, config.control_label)
        vectors = load_gene_vectors(config.embeddings_file, genes, config.control_label)
        encoder = ExternalGeneEncoder(config, labels, vectors)
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return encoder


# --- gene -> vector files ---------------------------------------------------------------


def load_gene_vectors(
    path: str | Path, genes: Sequence[str], control_label: str = "non-targeting"
) -> torch.Tensor:
    """float32 (len(genes), d): the file's vector of each gene, in the order of ``genes``.

    Formats, by suffix:
    - ``.csv`` / ``.tsv`` (optionally ``.gz``): one row per gene, the gene name then d numbers.
      A header is optional: the first row is taken as one when its first field is empty
      (pandas' index header) or a value field is not a number. A numeric header such as
      ``gene,0,1,2`` reads as a gene named "gene", which is harmless unless it is perturbed.
    - ``.npz``: a string array ``genes`` (n,) and ``vectors`` (n, d).
    - ``.pt``: ``torch.save({"genes": [...], "vectors": tensor (n, d)})``.

    Only the rows of ``genes`` are kept, so a genome-wide file costs no memory. A gene without
    a vector raises DataValidationError (file, genes, fix): never a zero vector.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            path,
            "embeddings_file",
            "no such file",
            "point embeddings_file to a gene -> vector file",
        )
    wanted = set(genes)
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if name.endswith(".npz"):
        found = _read_npz(path, wanted)
    elif name.endswith(".pt"):
        found = _read_pt(path, wanted)
    elif base.endswith((".csv", ".tsv")):
        found = _read_text(path, "," if base.endswith(".csv") else "\t", wanted)
    else:
        raise DataValidationError(
            path,
            "embeddings_file",
            "unknown format",
            "use a .csv, .tsv (optionally .gz), .npz (genes, vectors) or .pt file",
        )
    missing = [g for g in genes if g not in found]
    if missing:
        raise DataValidationError(
            path,
            "genes",
            f"no vector for {len(missing)} of {len(genes)} perturbed genes: {_preview(missing)}",
            "add vectors for these genes to the file (names match exactly), drop the "
            "perturbations that use them, or use kind='gene_table'; if one of them names the "
            f"control cells, set control_label (now {control_label!r}) to it",
        )
    rows = [found[g] for g in genes]
    for gene, row in zip(genes, rows, strict=True):
        if not np.isfinite(row).all():
            raise DataValidationError(
                path, "vectors", f"the vector of {gene!r} has NaN or inf", "fix that row"
            )
    return torch.from_numpy(np.stack(rows)).to(torch.float32)


def _select(path: Path, names, vectors, wanted: set[str]) -> dict[str, np.ndarray]:
    """Rows of a (genes, vectors) pair of arrays, checked for shape and unique names."""
    names = [str(n) for n in names]
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(names) or vectors.shape[1] < 1:
        raise DataValidationError(
            path,
            "vectors",
            f"vectors has shape {vectors.shape} for {len(names)} genes",
            "store vectors as (n_genes, d) with one row per entry of genes",
        )
    if dups := _duplicates(names):
        raise DataValidationError(
            path, "genes", f"genes listed twice: {_preview(dups)}", "keep one vector per gene"
        )
    return {n: vectors[i] for i, n in enumerate(names) if n in wanted}


def _read_npz(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        if "genes" not in z.files or "vectors" not in z.files:
            raise DataValidationError(
                path,
                "arrays",
                f"needs arrays 'genes' and 'vectors', found {sorted(z.files)}",
                "np.savez(path, genes=np.array(genes, dtype=str), vectors=matrix)",
            )
        try:
            names = z["genes"]
        except ValueError as err:  # an object array needs pickle, which we never load
            raise DataValidationError(
                path, "genes", "genes is an object array", "save it as np.array(genes, dtype=str)"
            ) from err
        if names.ndim != 1:
            raise DataValidationError(path, "genes", "genes must be 1-D", "store a flat array")
        return _select(path, names.tolist(), z["vectors"], wanted)


def _read_pt(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "genes" not in data or "vectors" not in data:
        raise DataValidationError(
            path,
            "contents",
            "expected a dict with 'genes' and 'vectors'",
            'torch.save({"genes": list_of_names, "vectors": tensor}, path)',
        )
    return _select(path, list(data["genes"]), torch.as_tensor(data["vectors"]).double(), wanted)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_text(path: Path, delimiter: str, wanted: set[str]) -> dict[str, np.ndarray]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    found: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    width = None
    with opener(path, "rt", newline="") as fh:
        for line, row in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if width is None:
                width = len(row)
                if width < 2:
                    raise DataValidationError(
                        path,
                        f"line {line}",
                        f"one field per row (delimiter {delimiter!r})",
                        "write the gene name then its numbers, separated by the delimiter",
                    )
                if not row[0].strip() or not all(_is_number(v) for v in row[1:]):
                    continue  # header
            if len(row) != width:
                raise DataValidationError(
                    path, f"line {line}", f"{len(row)} fields, expected {width}", "fix that row"
                )
            gene = row[0].strip()
            if gene in seen:
                raise DataValidationError(
                    path, f"line {line}", f"gene {gene!r} listed twice", "keep one vector per gene"
                )
            seen.add(gene)
            if gene in wanted:
                try:
                    found[gene] = np.array(row[1:], dtype=np.float64)
                except ValueError as err:
                    raise DataValidationError(
                        path, f"line {line}", f"non-numeric value for {gene!r}", "fix that row"
                    ) from err
    if width is None:
        raise DataValidationError(path, "rows", "the file is empty", "write one row per gene")
    return found
