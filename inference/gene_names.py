"""One rule for gene names, shared by every file written and every gene list read.

Written files. A file made from one input keeps that input's gene names: ``predict`` (CLI and
runtime) writes the controls file's var_names in its order, and HTTP ``/predict`` answers in
the names and order of ``controls.genes``. A file made from no input (``generate``) is indexed
by the model's gene keys (the Ensembl id where the training store had one, else the symbol).
Either way ``var`` has ``gene_id`` and ``gene_symbol``, never blank: the model's vocabulary
values, else the input's own id / symbol columns, else the gene's name (an Ensembl-like name
is an id, any other a symbol); a gene with only one known name carries it in both columns.

Read names. A name from a user (a controls file's var_names or its id / symbol columns, a
JSON ``controls.genes``) matches the model gene whose key, Ensembl id (any version) or symbol
it equals. A symbol two model genes share, or two names of one model gene in one list, is a
one-line error naming the gene. Perturbation labels are not gene names: they match the run's
labels exactly.

Pure Python (pandas imported inside ``var_frame`` only): the HTTP service uses this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from latentcell.data_pipelines.errors import DataValidationError

__all__ = ["GeneNames", "is_ensembl"]

_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?$")


def is_ensembl(name: str) -> bool:
    return bool(_ENSEMBL.match(name))


def _unversioned(name: str) -> str:
    match = _ENSEMBL.match(name)
    return match.group(1) if match else name


def _filled(gene_id: str, symbol: str, name: str) -> tuple[str, str]:
    """(id, symbol) with blanks filled by what is known (module docstring)."""
    gene_id = gene_id or (name if is_ensembl(name) else "")
    symbol = symbol or (name if not is_ensembl(name) else "")
    return gene_id or symbol, symbol or gene_id


@dataclass(frozen=True)
class GeneNames:
    """A model's genes in order: keys, ids and symbols ("" where unknown)."""

    keys: tuple[str, ...]
    ids: tuple[str, ...]
    symbols: tuple[str, ...]

    @classmethod
    def from_table(cls, table: dict) -> GeneNames:
        """From ``{"gene_key", "gene_id", "gene_symbol"}`` lists (bundle metadata, run stats)."""
        keys = [str(k) for k in table["gene_key"]]
        return cls.from_card(keys, table.get("gene_symbol"), table.get("gene_id"))

    @classmethod
    def from_card(cls, keys: Sequence[str], symbols=None, ids=None) -> GeneNames:
        """From a run card's keys (and symbols): a key is an id when it looks like one."""
        keys = tuple(str(k) for k in keys)

        def column(values, default) -> tuple[str, ...]:
            if isinstance(values, list | tuple) and len(values) == len(keys):
                return tuple("" if v is None else str(v) for v in values)
            return tuple(default(k) for k in keys)

        ids = column(ids, lambda k: _unversioned(k) if is_ensembl(k) else "")
        symbols = column(symbols, lambda k: "" if is_ensembl(k) else k)
        return cls(keys, ids, symbols)

    @classmethod
    def of(cls, predictor) -> GeneNames:
        """A predictor's ``gene_names``, else built from its ``genes`` and ``gene_symbols``."""
        names = getattr(predictor, "gene_names", None)
        if isinstance(names, GeneNames):
            return names
        return cls.from_card(predictor.genes, getattr(predictor, "gene_symbols", None))

    def to_dict(self) -> dict[str, list[str]]:
        """The bundle-metadata form: the vocabulary's own values, blanks kept."""
        return {"gene_key": list(self.keys), "gene_id": list(self.ids),
                "gene_symbol": list(self.symbols)}  # fmt: skip

    # -- reading ----------------------------------------------------------------------------

    @cached_property
    def _index(self) -> dict[str, set[int]]:
        index: dict[str, set[int]] = {}
        for g, names in enumerate(zip(self.keys, self.ids, self.symbols, strict=True)):
            for name in names:
                if name:
                    index.setdefault(_unversioned(name), set()).add(g)
        return index

    def lookup(self, name: str) -> list[int]:
        """Positions of the model genes ``name`` names (several: an ambiguous symbol)."""
        return sorted(self._index.get(name) or self._index.get(_unversioned(name), ()))

    def positions(self, names: Sequence[str], source, field: str, fix: str) -> list[int]:
        """For each model gene, the position in ``names`` naming it; unknown names are
        skipped, ambiguous or repeated ones and missing model genes raise."""
        found: dict[int, int] = {}
        for j, name in enumerate(names):
            hits = self.lookup(name)
            if len(hits) > 1:
                raise DataValidationError(
                    source, field, f"gene {name!r} names several of the model's genes "
                    f"{[self.keys[g] for g in hits]}", "name this gene by its Ensembl id",
                )  # fmt: skip
            if hits and hits[0] in found:
                raise DataValidationError(
                    source, field, f"{names[found[hits[0]]]!r} and {name!r} both name gene "
                    f"{self.keys[hits[0]]!r}", "name every gene once",
                )  # fmt: skip
            if hits:
                found[hits[0]] = j
        missing = [k for g, k in enumerate(self.keys) if g not in found]
        if missing:
            raise DataValidationError(
                source, field, f"{len(missing)} of the model's {len(self.keys)} genes are "
                f"missing, e.g. {missing[:5]}", fix,
            )  # fmt: skip
        return [found[g] for g in range(len(self.keys))]

    def first_match(self, candidates, source, fix: str) -> list[int]:
        """``positions`` in the first of several ``(field, names)`` namings of one input that
        names every model gene (var_names, then id / symbol columns); else the first's error."""
        first = None
        for field, names in candidates:
            try:
                return self.positions(names, source, field, fix)
            except DataValidationError as err:
                first = first or err
        raise first

    # -- writing ----------------------------------------------------------------------------

    def var_frame(self, var=None, rows: Sequence[int] | None = None):
        """A written file's var table (module docstring). ``var``: the input's (its names as
        index; ``rows[g]``: the row of model gene g), or None for the model's keys."""
        import pandas as pd

        from latentcell.data_pipelines.schemas import GENE_ID_FIELDS, GENE_SYMBOL_FIELDS

        if var is None:
            var = pd.DataFrame(index=pd.Index(self.keys, name="gene_key"))
            rows = range(len(self.keys))
        out = var.copy()
        names = [str(n) for n in out.index]
        ids, symbols = _own(out, GENE_ID_FIELDS), _own(out, GENE_SYMBOL_FIELDS)
        for g, row in enumerate(rows):
            ids[row] = self.ids[g] or ids[row]
            symbols[row] = self.symbols[g] or symbols[row]
        pairs = [_filled(i, s, n) for i, s, n in zip(ids, symbols, names, strict=True)]
        out["gene_id"] = [p[0] for p in pairs]
        out["gene_symbol"] = [p[1] for p in pairs]
        return out


def _own(var, fields: Sequence[str]) -> list[str]:
    """An input's first id (or symbol) column as strings, "" where missing or absent."""
    column = next((f for f in fields if f in var.columns), None)
    if column is None:
        return [""] * len(var)
    values = var[column]
    return ["" if missing else str(v) for v, missing in zip(values, values.isna(), strict=True)]
