"""One gene vocabulary for all inputs of a store, and the aligner onto it.

Keys. A gene's *vocabulary key* is its Ensembl id without the version suffix where the input
has one (a var id column such as ``gene_id``, or an index that looks like Ensembl ids), else its
symbol. Ids are preferred because symbols are renamed between annotation releases and are not
unique (a handful of human symbols name two Ensembl genes).

Across inputs (``resolve_keys``):
  * genes carrying an id match by id;
  * a gene without an id (a symbol-only input) matches the id-keyed entry carrying the same
    symbol when exactly one id carries it; when several ids carry it the match is ambiguous and
    raises; when none does, it stays keyed by its symbol.

Conflict rule (``check_symbol_conflicts``): for each symbol, take the set of Ensembl ids it is
paired with in each input that has ids. If two inputs pair the same symbol with *disjoint* id
sets, the inputs disagree on what the symbol means (different annotation releases) and the
build stops with a DataValidationError. Overlapping sets are fine (one input lists both genes
of a duplicated symbol, another only one of them). The same id under different symbols is not
an error: the id is the key, and the first-seen symbol is kept.

Join: ``union`` keeps first-seen order over the inputs in order (a single VCC file keeps its
gene order); ``intersection`` keeps the first input's order. A gene list file replaces both:
the store's genes are exactly the list, in list order; genes missing from an input are
zero-filled, and genes found in no input are kept as all-zero columns with a warning (so a
model's output dimension always matches the list, e.g. the VCC ``gene_names.csv``).

Another store's or a trained run's genes (``--genes-from``, ``reference_genes``): the store's
genes are exactly that vocabulary's KEYS, in its order, so a model trained on one store loads
onto the other gene by gene (``trainer/init_from_run.py`` matches by key). Each reference gene
is found in the inputs by key, else by its symbol (a run keyed by Ensembl ids, an input with
symbols only), else by its id; an input gene found under another key is re-keyed to the
reference's key. Genes found in no input are zero-filled, as with a list.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.errors import DataValidationError, LatentcellWarning
from latentcell.data_pipelines.schemas import Schema

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
GENE_JOINS = ("union", "intersection")


def looks_like_ensembl(values) -> np.ndarray:
    """Boolean mask: which values look like Ensembl gene ids (ENSG..., ENSMUSG..., versioned)."""
    return np.array([bool(ENSEMBL_RE.match(str(v))) for v in values], dtype=bool)


def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.16`` -> ``ENSG00000141510``; other ids unchanged."""
    return gene_id.split(".", 1)[0] if ENSEMBL_RE.match(gene_id) else gene_id


@dataclass(frozen=True)
class GeneTable:
    """One input's genes in its own column order. ``""`` where an id or symbol is unknown.

    ``keys``: the gene's own key (unversioned id if it has one, else symbol); the vocabulary
    may re-key symbol-only genes onto ids (see ``resolve_keys``).
    """

    ids: np.ndarray
    symbols: np.ndarray
    keys: np.ndarray

    @property
    def n_genes(self) -> int:
        return len(self.keys)


def input_genes(var: pd.DataFrame, schema: Schema, path: str) -> GeneTable:
    """Ids, symbols and keys of one input from its var table; duplicate keys raise."""
    index = var.index.astype(str).to_numpy()
    id_field = _first_present(var, schema.gene_id_fields)
    symbol_field = _first_present(var, schema.gene_symbol_fields)
    index_is_id = _index_is_id(index, schema.var_index)
    ids = _column_or(var, id_field, index if index_is_id else None)
    symbols = _column_or(var, symbol_field, None if index_is_id else index)
    if schema.var_index == "auto" and index_is_id and id_field is None:
        # a mostly-Ensembl index with odd entries (spike-ins): those are names, not ids
        not_id = ~looks_like_ensembl(ids)
        symbols = np.where(not_id & (symbols == ""), ids, symbols)
        ids = np.where(not_id, "", ids)
    keys = np.array(
        [strip_version(i) if i else s for i, s in zip(ids, symbols, strict=True)], dtype=object
    )
    field = f"var/{id_field}" if id_field else "var/_index"
    _check_keys(keys, path, field)
    return GeneTable(ids=ids, symbols=symbols, keys=keys)


def _first_present(var: pd.DataFrame, fields: tuple[str, ...]) -> str | None:
    return next((f for f in fields if f in var.columns), None)


def _index_is_id(index: np.ndarray, mode: str) -> bool:
    if mode in ("id", "symbol"):
        return mode == "id"
    return len(index) > 0 and looks_like_ensembl(index).mean() > 0.5


def _column_or(var: pd.DataFrame, field: str | None, default: np.ndarray | None) -> np.ndarray:
    """A var column as strings ("" for missing), else ``default``, else all ""."""
    if field is not None:
        col = var[field]
        return np.where(col.isna(), "", col.astype(str)).astype(object)
    if default is not None:
        return default.astype(object)
    return np.full(len(var), "", dtype=object)


def _check_keys(keys: np.ndarray, path: str, field: str) -> None:
    """Gene keys must be non-empty and unique within an input."""
    empty = np.flatnonzero(keys == "")
    if len(empty):
        raise DataValidationError(
            path,
            field,
            f"gene {int(empty[0])} has neither an Ensembl id nor a symbol",
            "give every gene a name in var_names (or a gene_id)",
        )
    dup = pd.Index(keys).duplicated()
    if dup.any():
        names = list(dict.fromkeys(keys[dup]))
        raise DataValidationError(
            path,
            field,
            f"duplicate gene names {names[:5]} ({len(names)} duplicated)",
            "make gene names unique (adata.var_names_make_unique()) or drop the duplicates",
        )


# ---------------------------------------------------------------- conflicts and re-keying


def check_symbol_conflicts(tables: list[GeneTable], paths: list[str]) -> None:
    """Raise if two inputs pair one symbol with disjoint Ensembl id sets (module docstring).

    Vectorised for the common case (a symbol keeps the id set it had in the first input that
    carried it); only symbols whose set differs take the per-symbol path.
    """
    first = pd.Series(dtype=object)  # symbol -> id-set signature where first seen
    first_path = pd.Series(dtype=object)
    other_sets: dict[str, list[tuple[frozenset, str]]] = {}  # further distinct sets
    for table, path in zip(tables, paths, strict=True):
        sig = _signatures(table)
        if sig.empty:
            continue
        known = first.reindex(sig.index)
        new = known.isna().to_numpy()
        differs = ~new & (known.to_numpy() != sig.to_numpy())
        check = set(sig.index[differs]) | (set(sig.index[~new]) & other_sets.keys())
        for symbol in check:
            ids = frozenset(sig[symbol].split("|"))
            prior = [(frozenset(first[symbol].split("|")), first_path[symbol])]
            prior += other_sets.get(symbol, [])
            _check_disjoint(symbol, ids, path, prior)
            if all(ids != other for other, _ in prior):
                other_sets.setdefault(symbol, []).append((ids, path))
        first = pd.concat([first, sig[new]])
        first_path = pd.concat([first_path, pd.Series(path, index=sig.index[new], dtype=object)])


def _check_disjoint(symbol: str, ids: frozenset, path: str, prior) -> None:
    for other, other_path in prior:
        if other.isdisjoint(ids):
            raise DataValidationError(
                path,
                "var",
                f"gene symbol {symbol!r} is Ensembl id {sorted(ids)} here but "
                f"{sorted(other)} in {other_path}",
                "annotate all inputs with the same Ensembl release, "
                "or build them into separate stores",
            )


def _symbol_id_pairs(table: GeneTable) -> pd.DataFrame:
    """(symbol ``s``, unversioned id ``i``) of the genes that have both."""
    both = (table.ids != "") & (table.symbols != "")
    return pd.DataFrame({"s": table.symbols[both], "i": table.keys[both]})


def _signatures(table: GeneTable) -> pd.Series:
    """symbol -> its ids in this input, sorted and joined by "|" (one id for most symbols)."""
    pairs = _symbol_id_pairs(table)
    dup = pairs["s"].duplicated(keep=False).to_numpy()
    single = pd.Series(pairs["i"].to_numpy()[~dup], index=pairs["s"].to_numpy()[~dup])
    if not dup.any():
        return single
    multi = pairs[dup].groupby("s")["i"].agg(lambda ids: "|".join(sorted(set(ids))))
    return pd.concat([single, multi])


def resolve_keys(tables: list[GeneTable], paths: list[str]) -> list[np.ndarray]:
    """Each input's vocabulary keys: symbol-only genes re-keyed onto the id carrying them."""
    check_symbol_conflicts(tables, paths)
    ids_by_symbol = None
    resolved = []
    for table, path in zip(tables, paths, strict=True):
        keys = table.keys.copy()
        no_id = np.flatnonzero(table.ids == "")
        if len(no_id):
            if ids_by_symbol is None:
                ids_by_symbol = _ids_by_symbol(tables)
            _rekey(keys, table.symbols[no_id], no_id, ids_by_symbol, path)
        _check_keys(keys, path, "var/_index")
        resolved.append(keys)
    return resolved


def _ids_by_symbol(tables: list[GeneTable]) -> pd.DataFrame:
    """Index symbol; columns ``n`` (distinct ids carrying it over all inputs) and ``i`` (one)."""
    pairs = pd.concat([_symbol_id_pairs(t) for t in tables]).drop_duplicates()
    grouped = pairs.groupby("s")["i"]
    return pd.DataFrame({"n": grouped.size(), "i": grouped.first()})


def _rekey(keys, symbols, positions, ids_by_symbol: pd.DataFrame, path: str) -> None:
    """Replace keys of id-less genes whose symbol one id carries; several ids raise."""
    match = ids_by_symbol.reindex(symbols)
    n = match["n"].fillna(0).to_numpy()
    if (n > 1).any():
        symbol = symbols[int(np.argmax(n > 1))]
        raise DataValidationError(
            path,
            "var/_index",
            f"gene symbol {symbol!r} has no Ensembl id here and matches several ids in "
            "other inputs",
            "add a gene_id var column to this input",
        )
    one = n == 1
    keys[positions[one]] = match["i"].to_numpy()[one]


# ---------------------------------------------------------------- the vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """Store genes: DataFrame indexed by ``gene_key`` with ``gene_id``/``gene_symbol`` strings."""

    var: pd.DataFrame

    @property
    def keys(self) -> pd.Index:
        return self.var.index

    def __len__(self) -> int:
        return len(self.var)

    def subset(self, keys) -> Vocabulary:
        """The genes ``keys`` (any iterable of keys in this vocabulary) in vocabulary order."""
        mask = self.var.index.isin(list(keys))
        return Vocabulary(self.var[mask])

    def lookup(self, name: str) -> list[str]:
        """Keys matching a gene id (any version) or symbol; several when a symbol is shared."""
        key = strip_version(name)
        if key in self.var.index:
            return [key]
        return self._keys_by_symbol.get(name, [])

    @cached_property
    def _keys_by_symbol(self) -> dict[str, list[str]]:
        by_symbol: dict[str, list[str]] = {}
        for key, symbol in zip(self.var.index, self.var["gene_symbol"], strict=True):
            if symbol:
                by_symbol.setdefault(symbol, []).append(key)
        return by_symbol


def build_vocabulary(
    tables: list[GeneTable], keys: list[np.ndarray], join: str = "union"
) -> Vocabulary:
    """Union (first-seen order) or intersection (first input's order) of resolved keys."""
    if join not in GENE_JOINS:
        raise ValueError(f"unknown gene join {join!r}; choose one of {GENE_JOINS}")
    order = _union_order(keys) if join == "union" else _intersection_order(keys)
    gene_id, gene_symbol = _annotations(tables, keys, order)
    var = pd.DataFrame({"gene_id": gene_id, "gene_symbol": gene_symbol}, index=order)
    var.index.name = "gene_key"
    return Vocabulary(var)


def _union_order(keys: list[np.ndarray]) -> pd.Index:
    order = pd.Index(keys[0], dtype=object)
    for k in keys[1:]:
        new = k[order.get_indexer(k) < 0]
        if len(new):
            order = order.append(pd.Index(new, dtype=object))
    return order


def _intersection_order(keys: list[np.ndarray]) -> pd.Index:
    order = pd.Index(keys[0], dtype=object)
    for k in keys[1:]:
        order = order[order.isin(k)]
    return order


def _annotations(tables, keys, order: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """First-seen non-empty id and symbol of every vocabulary key."""
    gene_id = np.full(len(order), "", dtype=object)
    gene_symbol = np.full(len(order), "", dtype=object)
    for table, k in zip(tables, keys, strict=True):
        pos = order.get_indexer(k)
        hit = pos >= 0
        for target, source in ((gene_id, table.ids), (gene_symbol, table.symbols)):
            fill = hit & (source != "")
            fill[fill] = target[pos[fill]] == ""
            target[pos[fill]] = source[fill]
    return gene_id, gene_symbol


def read_gene_list(path: str) -> list[str]:
    """Genes of a list file: one id or symbol per line; blank lines and ``#`` lines skipped.

    A first field before a comma is used, so a one-column CSV (VCC ``gene_names.csv``) works.
    """
    file = Path(path)
    if not file.is_file():
        raise DataValidationError(path, "--genes", "gene list file not found", "check the path")
    names = []
    for line in file.read_text().splitlines():
        name = line.split(",", 1)[0].strip().strip('"')
        if name and not name.startswith("#"):
            names.append(name)
    if not names:
        raise DataValidationError(path, "--genes", "gene list is empty", "list one gene per line")
    dup = pd.Index(names).duplicated()
    if dup.any():
        raise DataValidationError(
            path, "--genes", f"gene {names[int(np.argmax(dup))]!r} listed twice", "list it once"
        )
    return names


def vocabulary_from_list(vocab: Vocabulary, names: list[str], path: str) -> Vocabulary:
    """The listed genes, in list order, matched to ``vocab`` by id or symbol.

    Genes found in no input are kept as zero-filled columns and reported in one warning.
    """
    rows, unknown = [], []
    for name in names:
        matches = vocab.lookup(name)
        if len(matches) > 1:
            raise DataValidationError(
                path,
                "--genes",
                f"symbol {name!r} names several genes {matches}",
                "list Ensembl ids for this gene instead of the symbol",
            )
        if matches:
            key = matches[0]
            rows.append((key, vocab.var.at[key, "gene_id"], vocab.var.at[key, "gene_symbol"]))
        else:
            unknown.append(name)
            is_id = bool(ENSEMBL_RE.match(name))
            rows.append((strip_version(name), name if is_id else "", "" if is_id else name))
    if unknown:
        warnings.warn(
            f"{path}: {len(unknown)} listed genes occur in no input and will be all-zero "
            f"columns: {unknown[:10]}",
            LatentcellWarning,
            stacklevel=2,
        )
    var = pd.DataFrame(rows, columns=["gene_key", "gene_id", "gene_symbol"]).set_index("gene_key")
    if var.index.duplicated().any():
        dup = var.index[var.index.duplicated()][0]
        raise DataValidationError(
            path, "--genes", f"two listed names resolve to gene {dup!r}", "list it once"
        )
    return Vocabulary(var)


# ---------------------------------------------------------------- the genes of a store or a run

_GENES_FROM = "--genes-from"
_GENES_FROM_FIX = (
    "pass a store built by `latentcell data build` or the run.dir of a finished ST run"
)


@dataclass(frozen=True)
class ReferenceGenes:
    """An existing vocabulary: keys in order, ids and symbols ("" where unknown), and where
    it came from (``kind`` "store" or "run")."""

    keys: list[str]
    ids: list[str]
    symbols: list[str]
    source: str
    kind: str


def read_reference_genes(path: str | Path) -> ReferenceGenes:
    """The genes of a store (its manifest's ``var``) or of a finished run (its model card's
    ``genes`` and ``gene_symbols``); anything else is one DataValidationError."""
    root = Path(path).absolute()
    card = root / "final" / "model_config.json"
    if card.is_file():
        return _run_genes(root, card)
    looks_like_store = root.is_dir() and (
        (root / "manifest.json").exists()
        or (root / "zarr.json").exists()
        or any(root.glob("*.tar"))
    )
    if not looks_like_store:
        problem = (
            "neither a store (no manifest.json) nor a finished run (no final/model_config.json)"
            if root.exists()
            else "no such store or run directory"
        )
        raise DataValidationError(root, _GENES_FROM, problem, _GENES_FROM_FIX)
    from latentcell.data_pipelines.store_common import read_manifest

    manifest = read_manifest(root)  # its own errors name the manifest and the fix
    if manifest["format"] == "latent":
        raise DataValidationError(
            root, _GENES_FROM, "a latent store holds a VAE's latents, not genes",
            "pass the count store it was encoded from",
        )  # fmt: skip
    var = manifest.get("var")
    keys = var.get("gene_key") if isinstance(var, dict) else None
    if not _names(keys):
        raise DataValidationError(
            root / "manifest.json", "var.gene_key", "no gene list", "rebuild the store"
        )
    n = len(keys)
    return ReferenceGenes(
        keys=[str(k) for k in keys],
        ids=_strings(var.get("gene_id"), n),
        symbols=_strings(var.get("gene_symbol"), n),
        source=str(root),
        kind="store",
    )


def _run_genes(root: Path, card_path: Path) -> ReferenceGenes:
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise DataValidationError(
            card_path, "json", f"unreadable ({err})", "point --genes-from to an intact run"
        ) from err
    keys = card.get("genes") if isinstance(card, dict) else None
    if keys is None:
        raise DataValidationError(
            card_path, "genes", "this run's model card lists no genes (ST runs record them)",
            "pass the store the run was trained on (data.path in its config.toml)",
        )  # fmt: skip
    if not _names(keys):
        raise DataValidationError(
            card_path, "genes", "not a list of gene names", "point --genes-from to an intact run"
        )
    return ReferenceGenes(
        keys=[str(k) for k in keys],
        ids=[k if ENSEMBL_RE.match(k) else "" for k in map(str, keys)],
        symbols=_strings(card.get("gene_symbols"), len(keys)),
        source=str(root),
        kind="run",
    )


def _names(values) -> bool:
    return isinstance(values, list) and len(values) > 0 and all(isinstance(v, str) for v in values)


def _strings(values, n: int) -> list[str]:
    """A list of n names, or n blanks when absent or malformed (ids and symbols are extras)."""
    ok = isinstance(values, list) and len(values) == n
    return [str(v) if ok and v is not None else "" for v in (values if ok else [None] * n)]


@dataclass(frozen=True)
class ReferencePlan:
    """The store's vocabulary (the reference's keys in order), the inputs' keys re-keyed onto
    it, and the reference genes found in no input."""

    vocabulary: Vocabulary
    input_keys: list[np.ndarray]
    unknown: list[str]


def vocabulary_from_reference(
    vocab: Vocabulary, input_keys: list[np.ndarray], ref: ReferenceGenes
) -> ReferencePlan:
    """The reference's genes, keys and order kept, matched to the inputs' ``vocab`` by key,
    else symbol, else id (module docstring). Ambiguous matches raise."""
    dup = pd.Index(ref.keys).duplicated()
    if dup.any():
        raise DataValidationError(
            ref.source, _GENES_FROM, f"gene {ref.keys[int(np.argmax(dup))]!r} listed twice",
            "rebuild that store or run",
        )  # fmt: skip
    rows, unknown, rename, owner = [], [], {}, {}
    for key, gene_id, symbol in zip(ref.keys, ref.ids, ref.symbols, strict=True):
        names = (n for n in (key, symbol, gene_id) if n)
        matches = next((m for m in map(vocab.lookup, names) if m), [])
        if len(matches) > 1:
            raise DataValidationError(
                ref.source, _GENES_FROM, f"gene {key!r} names several input genes {matches}",
                "give the inputs Ensembl ids (a gene_id var column)",
            )  # fmt: skip
        if not matches:
            unknown.append(key)
            rows.append((key, gene_id, symbol))
            continue
        found = matches[0]
        if found in owner:
            raise DataValidationError(
                ref.source, _GENES_FROM,
                f"genes {owner[found]!r} and {key!r} both match input gene {found!r}",
                "give the inputs Ensembl ids (a gene_id var column)",
            )  # fmt: skip
        owner[found] = key
        if found != key:
            rename[found] = key
        var = vocab.var.loc[found]
        rows.append((key, gene_id or var["gene_id"], symbol or var["gene_symbol"]))
    if unknown:
        warnings.warn(
            f"{ref.source}: {len(unknown)} of its genes occur in no input and will be all-zero "
            f"columns: {unknown[:10]}",
            LatentcellWarning,
            stacklevel=2,
        )
    var = pd.DataFrame(rows, columns=["gene_key", "gene_id", "gene_symbol"]).set_index("gene_key")
    rekeyed = [np.array([rename.get(k, k) for k in keys], dtype=object) for keys in input_keys]
    return ReferencePlan(Vocabulary(var), rekeyed, unknown)


# ---------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Aligner:
    """Maps an input's CSR columns onto store columns: ``col_map[j]`` or -1 to drop.

    Vectorised: one gather of the column map over ``indices``, a mask, a per-row count and a
    CSR re-sort. Store genes missing from the input are simply absent entries (zero-filled).
    """

    col_map: np.ndarray
    n_out: int

    @property
    def is_identity(self) -> bool:
        n = len(self.col_map)
        return n == self.n_out and bool(np.array_equal(self.col_map, np.arange(n)))

    def __call__(self, X: sp.csr_matrix) -> sp.csr_matrix:
        X = sp.csr_matrix(X)
        out = X.astype(np.float32, copy=False) if self.is_identity else self._remap(X)
        out.sum_duplicates()  # canonical: sorted, unique column indices per row
        out.eliminate_zeros()
        return out

    def _remap(self, X: sp.csr_matrix) -> sp.csr_matrix:
        cols = self.col_map[X.indices]
        keep = cols >= 0
        row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        counts = np.bincount(row_of[keep], minlength=X.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        data = X.data[keep].astype(np.float32, copy=False)
        return sp.csr_matrix(
            (data, cols[keep].astype(np.int32), indptr), shape=(X.shape[0], self.n_out)
        )


def make_aligner(input_keys: np.ndarray, store_keys: pd.Index) -> Aligner:
    """Aligner from one input's (resolved) keys to the store's keys."""
    col_map = pd.Index(store_keys).get_indexer(pd.Index(input_keys, dtype=object))
    return Aligner(col_map=col_map.astype(np.int64), n_out=len(store_keys))
