"""``latentcell data build``: h5ad inputs -> one validated, vocabulary-aligned store.

Order of work, chosen so that bad input never leaves anything at ``out``:
  1. open every input and check its structure (``open_input``), before any writing;
  2. plan the store: role columns, store-wide categories, the gene vocabulary;
  3. optional HVG passes (they validate counts as they stream, so a bad value stops the build
     before the writer exists);
  4. per input, read the cells sorted stably by (cell_type, perturbation, batch) so each group
     is one contiguous row range, validate values (unless the HVG pass already saw every cell),
     align genes, and append blocks to the writer; the writer publishes atomically in
     ``finish`` and removes its temporary directory if anything raises. Rows are gathered
     directly in that order, or, for large files whose groups are scattered, spill-sorted
     through temporary bucket files in ``spill_dir`` (see ``h5ad_input.plan_ordered_read``).

Obs columns: role columns are categorical (numbers become strings); other string columns are
categorical and numeric columns numeric. Categories are the union over inputs in first-seen
order. A column absent from an input is code -1 / NaN there, except role columns, whose cells
get the label ``IMPLICIT_LABEL``. The cell-type role always exists in the store: without any
cell-type column, every cell gets ``IMPLICIT_LABEL`` in a column named ``cell_type``.
Two columns are added: ``_source_file`` (input path) and ``_source_row`` (row in that input).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from latentcell.data_pipelines.blocks import CellBlock, StoreSpec
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.h5ad_input import (
    DEFAULT_BUCKET_NNZ,
    InputFile,
    OrderedReadPlan,
    iter_ordered,
    open_input,
    plan_ordered_read,
)
from latentcell.data_pipelines.hvg import LOESS_SPAN, sample_rows, seurat_v3, target_genes
from latentcell.data_pipelines.schemas import (
    IMPLICIT_LABEL,
    ROLE_FLAGS,
    SCHEMAS,
    Schema,
    get_schema,
)
from latentcell.data_pipelines.store_layout import (
    NAMES_COLUMN,
    SOURCE_FILE_COLUMN,
    SOURCE_ROW_COLUMN,
)
from latentcell.data_pipelines.validate import BlockContext, check_counts
from latentcell.data_pipelines.vocabulary import (
    GENE_JOINS,
    Vocabulary,
    build_vocabulary,
    make_aligner,
    read_gene_list,
    read_reference_genes,
    resolve_keys,
    vocabulary_from_list,
    vocabulary_from_reference,
)
from latentcell.data_pipelines.zarr_store import CODECS, DEFAULT_CODEC

log = logging.getLogger(__name__)

STORE_ROLES = ("cell_type", "perturbation", "batch")  # the StoreSpec roles, in sort order
DEFAULT_READ_CELLS = 4096  # cells per read from an input (memory ~ read_cells * nnz per cell)
RESERVED_COLUMNS = (SOURCE_FILE_COLUMN, SOURCE_ROW_COLUMN, NAMES_COLUMN)


# ---------------------------------------------------------------- obs planning


@dataclass(frozen=True)
class ObsPlan:
    """Store-wide obs layout: role columns, categories, numeric dtypes, the control label."""

    roles: dict[str, str | None]
    control_label: str | None
    guide_column: str | None
    categories: dict[str, list[str]]
    numeric_dtypes: dict[str, str]


def plan_obs(inputs: list[InputFile]) -> ObsPlan:
    """Role columns agreed across inputs, then categories and dtypes of every obs column."""
    roles = {role: _agreed_column(inputs, role) for role in (*STORE_ROLES, "guide")}
    if roles["cell_type"] is None:
        roles["cell_type"] = _implicit_column_name(inputs)
    control = _agreed_control(inputs)
    role_cols = {c for r, c in roles.items() if r in STORE_ROLES and c is not None}
    kinds = _column_kinds(inputs, role_cols | ({roles["guide"]} - {None}))
    categories = {
        col: _union_categories(inputs, col, col in role_cols)
        for col, kind in kinds.items()
        if kind == "categorical"
    }
    _check_role_names(inputs, roles, categories)
    categories[SOURCE_FILE_COLUMN] = [inp.path for inp in inputs]
    numeric = {col: kind for col, kind in kinds.items() if kind != "categorical"}
    numeric[SOURCE_ROW_COLUMN] = "int64"
    return ObsPlan(
        roles={r: roles[r] for r in STORE_ROLES},
        control_label=control,
        guide_column=roles["guide"],
        categories=categories,
        numeric_dtypes=numeric,
    )


def _agreed_column(inputs: list[InputFile], role: str) -> str | None:
    """The one column name used for ``role`` by every input that has it."""
    found = {inp.roles.column(role) for inp in inputs} - {None}
    if len(found) > 1:
        raise DataValidationError(
            inputs[0].path,
            "obs",
            f"inputs use different {role} columns {sorted(found)}",
            f"rename the column to one name in every input, or pass {ROLE_FLAGS[role]}",
        )
    return found.pop() if found else None


def _check_role_names(inputs: list[InputFile], roles: dict, categories: dict) -> None:
    """Loaders deliver each role column under its role's name too (``obs["cell_type"]``), so
    a label column named like a role but not playing it would be ambiguous in every training
    run: refuse it here, where the fix is one flag away."""
    for role in STORE_ROLES:
        column = roles[role]
        if column is None or column == role or role not in categories:
            continue
        holder = next(inp.path for inp in inputs if role in inp.file.obs.columns)
        raise DataValidationError(
            holder,
            f"obs/{role}",
            f"the {role} role is column {column!r}, but the file also has a column named "
            f"{role!r}, which training would confuse with it",
            f"pass {ROLE_FLAGS[role]} {role} to use that column instead, or drop or rename "
            f"obs[{role!r}] in the input",
        )


def _implicit_column_name(inputs: list[InputFile]) -> str:
    """``cell_type``, unless some input already uses that name for a non-role column."""
    taken = any("cell_type" in inp.file.obs.columns for inp in inputs)
    return "implicit_cell_type" if taken else "cell_type"


def _agreed_control(inputs: list[InputFile]) -> str | None:
    labels = {inp.roles.control for inp in inputs} - {None}
    if len(labels) > 1:
        raise DataValidationError(
            inputs[0].path,
            "obs",
            f"inputs label control cells differently {sorted(labels)}",
            "relabel the control cells to one label in every input",
        )
    return labels.pop() if labels else None


def _column_kinds(inputs: list[InputFile], label_cols: set[str]) -> dict[str, str]:
    """Column -> "categorical" | numpy dtype string, merged over inputs (see module doc).

    ``label_cols`` (role and guide columns) are categorical whatever their dtype.
    """
    seen: dict[str, list[tuple[str, bool]]] = {}
    for inp in inputs:
        for col in inp.file.obs.columns:
            if col in RESERVED_COLUMNS:
                raise DataValidationError(
                    inp.path,
                    f"obs/{col}",
                    f"obs column {col!r} is reserved for the store",
                    "rename or drop that column",
                )
            series = inp.file.obs[col]
            kind = "categorical" if col in label_cols else _series_kind(series)
            seen.setdefault(col, []).append((kind, bool(series.isna().any())))
    kinds = {col: _merge_kinds(k, len(k) == len(inputs)) for col, k in seen.items()}
    for col in label_cols:
        kinds[col] = "categorical"  # also role columns no input has (the implicit cell type)
    return kinds


def _series_kind(series: pd.Series) -> str:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int64"
    if pd.api.types.is_float_dtype(dtype):
        return "float64"
    return "categorical"


def _merge_kinds(kinds: list[tuple[str, bool]], in_every_input: bool) -> str:
    names = {k for k, _ in kinds}
    if "categorical" in names:
        return "categorical"
    exact = in_every_input and not any(na for _, na in kinds)
    if exact and names == {"bool"}:
        return "bool"
    if exact and names <= {"bool", "int64"}:
        return "int64"
    return "float64"


def _labels(series: pd.Series) -> np.ndarray:
    """Values as strings, None where missing (so NaN never becomes the label "nan")."""
    missing = series.isna().to_numpy()
    text = series.astype(object).astype(str).to_numpy(dtype=object)
    text[missing] = None
    return text


def _input_categories(series: pd.Series) -> list[str]:
    """Used categories in declared order (categorical) or sorted (other values)."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        used = series.cat.remove_unused_categories().cat.categories
        return [str(c) for c in used]
    return sorted({v for v in _labels(series) if v is not None})


def _union_categories(inputs: list[InputFile], col: str, is_role: bool) -> list[str]:
    cats: dict[str, None] = {}
    for inp in inputs:
        if col in inp.file.obs.columns:
            cats.update(dict.fromkeys(_input_categories(inp.file.obs[col])))
        elif is_role:
            cats[IMPLICIT_LABEL] = None
    return list(cats)


def input_codes(inp: InputFile, plan: ObsPlan, index: int) -> dict[str, np.ndarray]:
    """int32 codes of every store categorical column for one input's cells."""
    role_cols = set(plan.roles.values())
    codes = {}
    for col, cats in plan.categories.items():
        if col == SOURCE_FILE_COLUMN:
            codes[col] = np.full(inp.n_cells, index, dtype=np.int32)
        elif col in inp.file.obs.columns:
            labels = _labels(inp.file.obs[col])
            if col in role_cols:
                _check_role_labels(inp, col, labels)
            codes[col] = pd.Categorical(labels, categories=cats).codes.astype(np.int32)
        else:
            fill = cats.index(IMPLICIT_LABEL) if col in role_cols else -1
            codes[col] = np.full(inp.n_cells, fill, dtype=np.int32)
    return codes


def _check_role_labels(inp: InputFile, col: str, labels: np.ndarray) -> None:
    missing = np.flatnonzero(pd.isna(labels))
    if len(missing):
        row = int(missing[0])
        raise DataValidationError(
            inp.path,
            f"obs/{col}",
            f"{len(missing)} cells have no {col} label (first: row {row}, "
            f"obs {inp.file.obs_names[row]!r})",
            "fill in the labels or drop those cells",
        )


def input_numeric(inp: InputFile, plan: ObsPlan) -> dict[str, np.ndarray]:
    """Numeric store columns for one input's cells (NaN where the input lacks the column)."""
    out = {}
    for col, dtype in plan.numeric_dtypes.items():
        if col == SOURCE_ROW_COLUMN:
            out[col] = np.arange(inp.n_cells, dtype=np.int64)
        elif col in inp.file.obs.columns:
            series = inp.file.obs[col]
            na = {"na_value": np.nan} if dtype == "float64" else {}
            out[col] = series.to_numpy(dtype=dtype, **na)
        else:
            out[col] = np.full(inp.n_cells, np.nan)
    return out


def group_order(codes: dict[str, np.ndarray], roles: dict[str, str | None], n: int) -> np.ndarray:
    """Rows sorted stably by (cell_type, perturbation, batch) codes: groups become contiguous."""
    keys = [codes[roles[r]] if roles[r] else np.zeros(n, np.int32) for r in STORE_ROLES]
    return np.lexsort(keys[::-1])


# ---------------------------------------------------------------- genes


@dataclass(frozen=True)
class GenePlan:
    """The vocabulary (join of all inputs, or the gene list) and per-input resolved keys.

    HVG selection, when asked, picks the stored genes from ``vocabulary``.
    """

    vocabulary: Vocabulary
    input_keys: list[np.ndarray]
    info: dict = field(default_factory=dict)


def plan_genes(
    inputs: list[InputFile], join: str, genes_file: str | None, genes_from: str | None = None
) -> GenePlan:
    tables = [inp.genes for inp in inputs]
    keys = resolve_keys(tables, [inp.path for inp in inputs])
    vocab = build_vocabulary(tables, keys, join)
    info = {"gene_join": join, "n_vocabulary": len(vocab)}
    if genes_from is not None:  # another store's or run's keys, in its order
        ref = read_reference_genes(genes_from)
        plan = vocabulary_from_reference(vocab, keys, ref)
        info.update(genes_from=ref.source, genes_from_kind=ref.kind, genes_unknown=plan.unknown)
        return GenePlan(vocabulary=plan.vocabulary, input_keys=plan.input_keys, info=info)
    if genes_file is not None:
        names = read_gene_list(genes_file)
        listed = vocabulary_from_list(vocab, names, genes_file)
        unknown = [k for k in listed.keys if k not in vocab.keys]
        info.update(genes_file=os.path.abspath(genes_file), genes_unknown=unknown)
        return GenePlan(vocabulary=listed, input_keys=keys, info=info)
    if len(vocab) == 0:
        raise DataValidationError(
            inputs[0].path,
            "var",
            "the inputs share no genes",
            "use the union gene join, or check the inputs' gene ids",
        )
    return GenePlan(vocabulary=vocab, input_keys=keys, info=info)


# ---------------------------------------------------------------- streaming


def _validator(inp: InputFile, integer: bool):
    names = inp.file.obs_names
    genes = np.where(inp.genes.symbols != "", inp.genes.symbols, inp.genes.keys)

    def check(rows: np.ndarray, X: sp.csr_matrix) -> None:
        check_counts(X, BlockContext(inp.path, rows, names, genes), integer=integer)

    return check


def block_transform(inp: InputFile, aligner, validate: bool, integer: bool):
    """validate (if asked) then align: what every block read from ``inp`` goes through."""
    check = _validator(inp, integer) if validate else None

    def transform(rows: np.ndarray, X: sp.csr_matrix) -> sp.csr_matrix:
        if check is not None:
            check(rows, X)
        return aligner(X)

    return transform


def stream_aligned(
    inputs: list[InputFile],
    aligners: list,
    read_cells: int,
    rows: list[np.ndarray | None],
    validate: bool,
    integer: bool,
) -> Iterator[tuple[int, np.ndarray, sp.csr_matrix]]:
    """(input index, input rows, aligned CSR) blocks over the inputs, in file (or ``rows``)
    order: the sequential reads of the HVG passes."""
    for i, (inp, aligner) in enumerate(zip(inputs, aligners, strict=True)):
        transform = block_transform(inp, aligner, validate, integer)
        for r, X in inp.file.iter_blocks(read_cells, rows[i]):
            yield i, r, transform(r, X)
        inp.file.release()


@dataclass(frozen=True)
class HvgSettings:
    n_top: int
    combine_targets: bool = False
    sample_cells: int | None = None
    seed: int = 0


def select_genes(
    inputs: list[InputFile],
    genes: GenePlan,
    obs: ObsPlan,
    settings: HvgSettings,
    read_cells: int,
    integer: bool,
) -> tuple[Vocabulary, dict, bool]:
    """Seurat v3 HVGs (plus perturbed targets) over all or sampled cells.

    Returns (stored genes, info for the manifest, whether every cell was value-validated).
    """
    vocab = genes.vocabulary
    aligners = [make_aligner(k, vocab.keys) for k in genes.input_keys]
    sizes = [inp.n_cells for inp in inputs]
    sampled = settings.sample_cells is not None and settings.sample_cells < sum(sizes)
    rows = (
        sample_rows(sizes, settings.sample_cells, settings.seed)
        if sampled
        else [None] * len(inputs)
    )
    passes = []

    def blocks():
        validate = not passes  # counts are validated on the first pass only
        passes.append(1)
        for _, _, X in stream_aligned(inputs, aligners, read_cells, rows, validate, integer):
            yield X

    start = time.perf_counter()
    table = seurat_v3(blocks, len(vocab), settings.n_top)
    chosen = set(vocab.keys[table["highly_variable"].to_numpy()])
    info = {
        "flavor": "seurat_v3",
        "n_top_genes": settings.n_top,
        "loess_span": LOESS_SPAN,
        "sample_cells": settings.sample_cells,
        "n_cells_used": int(sum(len(r) for r in rows) if sampled else sum(sizes)),
        "seed": settings.seed,
        "combine_targets": settings.combine_targets,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if settings.combine_targets:
        added, missing = _target_keys(vocab, obs)
        info.update(n_targets_added=len(added - chosen), targets_missing=missing)
        chosen |= added
    return vocab.subset(chosen), info, not sampled


def _target_keys(vocab: Vocabulary, obs: ObsPlan) -> tuple[set, list[str]]:
    """Vocabulary keys of the perturbed genes, and the labels that match no gene."""
    col = obs.roles["perturbation"]
    if col is None:
        return set(), []
    labels = target_genes(obs.categories[col], exclude=(obs.control_label, IMPLICIT_LABEL))
    keys, missing = set(), []
    for label in labels:
        found = vocab.lookup(label)
        keys.update(found)
        if not found:
            missing.append(label)
    return keys, missing


@dataclass(frozen=True)
class WriteSettings:
    read_cells: int
    validate: bool
    integer: bool
    spill_dir: str
    bucket_nnz: int = DEFAULT_BUCKET_NNZ


def input_order(inp: InputFile, obs: ObsPlan, index: int) -> tuple[dict, np.ndarray]:
    """(store codes of the input's cells, their group-sorted row order)."""
    codes = input_codes(inp, obs, index)
    return codes, group_order(codes, obs.roles, inp.n_cells)


def read_plans(inputs: list[InputFile], obs: ObsPlan, read_cells: int) -> list[OrderedReadPlan]:
    """Per input: gather rows directly in group order, or spill-sort (see OrderedReadPlan)."""
    plans = []
    for i, inp in enumerate(inputs):
        plans.append(plan_ordered_read(inp.file, input_order(inp, obs, i)[1], read_cells))
        inp.file.release()
    return plans


def write_store(
    inputs: list[InputFile],
    obs: ObsPlan,
    genes: GenePlan,
    stored: Vocabulary,
    plans: list[OrderedReadPlan],
    writer,
    settings: WriteSettings,
) -> None:
    """Append every input's cells, group-sorted, aligned to the stored genes."""
    for i, inp in enumerate(inputs):
        write_input(inp, i, obs, genes.input_keys[i], stored, plans[i], writer, settings)


def write_input(
    inp: InputFile,
    index: int,
    obs: ObsPlan,
    input_keys: np.ndarray,
    stored: Vocabulary,
    plan: OrderedReadPlan,
    writer,
    settings: WriteSettings,
) -> None:
    """Append input ``index``'s cells, group-sorted: one input of ``write_store``, or one part
    of a distributed build (``distributed_build``)."""
    codes, order = input_order(inp, obs, index)
    numeric = input_numeric(inp, obs)
    names = inp.file.obs_names
    aligner = make_aligner(input_keys, stored.keys)
    transform = block_transform(inp, aligner, settings.validate, settings.integer)
    blocks = iter_ordered(
        inp.file,
        order,
        settings.read_cells,
        transform,
        plan,
        settings.spill_dir,
        settings.bucket_nnz,
    )
    for r, X in blocks:
        writer.append(
            CellBlock(
                X=X,
                rows=np.full(len(r), -1, dtype=np.int64),
                library_size=_row_sums(X),
                codes={c: v[r] for c, v in codes.items()},
                numeric={c: v[r] for c, v in numeric.items()},
                names=names[r],
            )
        )
    inp.file.release()
    log.info("wrote %s (%d cells, %s reads)", inp.path, inp.n_cells, plan.mode)


def _row_sums(X: sp.csr_matrix) -> np.ndarray:
    """Library size over the stored genes: summed in float64, stored as float32."""
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)


# ---------------------------------------------------------------- the entry point


def build_store(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    format: str = "zarr",
    schema: str = "auto",
    hvg: int | None = None,
    combine_targets: bool = False,
    genes_file: str | os.PathLike | None = None,
    genes_from: str | os.PathLike | None = None,
    pert_col: str | None = None,
    control: str | None = None,
    batch_col: str | None = None,
    cell_type_col: str | None = None,
    guide_col: str | None = None,
    gene_join: str = "union",
    chunk_cells: int | None = None,
    block_cells: int | None = None,
    cells_per_shard: int | None = None,
    codec: str | None = None,
    read_cells: int = DEFAULT_READ_CELLS,
    overwrite: bool = False,
    hvg_sample_cells: int | None = None,
    integer_counts: bool = True,
    seed: int = 0,
    spill_dir: str | os.PathLike | None = None,
    bucket_nnz: int = DEFAULT_BUCKET_NNZ,
    scheduler: str | None = None,
    workers: int | None = None,
    part_fn=None,
) -> str:
    """Build a store at ``out`` from h5ad ``inputs``; returns the store path.

    scheduler: None or "none" builds in this process; "processes" (a local Dask cluster of
    ``workers`` processes) or "tcp://HOST:PORT" (a running Dask scheduler) writes each input
    as its own part on a worker and merges them (``distributed_build``; one input always
    builds here). part_fn: the function that writes one part (tests inject failures).
    Raises DataValidationError (nothing at ``out``) for any bad input, ValueError for
    inconsistent options. See the module docstring for the order of work.
    """
    from latentcell.data_pipelines.stores import make_writer

    paths = _input_paths(inputs)
    writer_opts = _writer_options(format, chunk_cells, block_cells, cells_per_shard, codec)
    _check_options(hvg, combine_targets, genes_file, gene_join, read_cells)
    if genes_from is not None and (hvg is not None or genes_file is not None):
        raise _option("--genes-from", "--genes-from, --genes and --hvg are alternatives",
                      "pass one of them")  # fmt: skip
    distributed = _check_scheduler(scheduler, workers) and len(paths) > 1
    _check_out(out, overwrite)
    schema_obj = get_schema(
        schema,
        pert_col=pert_col,
        control=control,
        batch_col=batch_col,
        cell_type_col=cell_type_col,
        guide_col=guide_col,
    )
    opened = open_inputs(paths, schema_obj)
    try:
        obs = plan_obs(opened)
        genes = plan_genes(
            opened, gene_join, None if genes_file is None else str(genes_file),
            None if genes_from is None else str(genes_from),
        )  # fmt: skip
        plans = read_plans(opened, obs, read_cells)  # also checks role labels: before any X
        stored, hvg_info, validated = genes.vocabulary, None, False
        if hvg is not None:
            hvg_settings = HvgSettings(hvg, combine_targets, hvg_sample_cells, seed)
            stored, hvg_info, validated = select_genes(
                opened, genes, obs, hvg_settings, read_cells, integer_counts
            )
        options = {
            "schema": schema_obj.name,
            "roles": obs.roles,
            "control_label": obs.control_label,
            "guide_column": obs.guide_column,
            "implicit_label": IMPLICIT_LABEL,
            "genes": genes.info,
            "hvg": hvg_info,
            "integer_counts": integer_counts,
            "read_cells": read_cells,
            "writer": writer_opts,
        }
        spec = StoreSpec(
            var=stored.var,
            categories=obs.categories,
            numeric_dtypes=obs.numeric_dtypes,
            roles=obs.roles,
            control_label=obs.control_label,
            inputs=[_input_record(inp, plan) for inp, plan in zip(opened, plans, strict=True)],
            build_options=options,
        )
        settings = WriteSettings(
            read_cells=read_cells,
            validate=not validated,
            integer=integer_counts,
            spill_dir="" if spill_dir is None else str(spill_dir),
            bucket_nnz=bucket_nnz,
        )
        if distributed:
            from latentcell.data_pipelines.distributed_build import BuildPlan, build_distributed

            plan = BuildPlan(schema_obj, obs, genes.input_keys, stored, plans, spec, format,
                             writer_opts, settings)  # fmt: skip
            return build_distributed(plan, out, scheduler, workers, overwrite, part_fn)
        with make_writer(format, out, spec, overwrite=overwrite, **writer_opts) as writer:
            for stale in writer.removed_stale:
                print(f"removed {stale}: the temporary directory of a build that was killed")
            # inside the build's own temporary directory unless asked otherwise, so a
            # killed build's spill files go with it (see ``atomic.remove_stale_builds``)
            settings = replace(settings, spill_dir=settings.spill_dir or str(writer.scratch))
            write_store(opened, obs, genes, stored, plans, writer, settings)
            return writer.finish()
    finally:
        for inp in opened:
            inp.close()


def open_inputs(paths: list[str], schema: Schema) -> list[InputFile]:
    """Open and structurally validate every input (closing all of them on the first error)."""
    opened: list[InputFile] = []
    try:
        for path in paths:
            inp = open_input(path, schema)
            inp.file.release()  # obs/var stay; the file reopens when its cells are read
            opened.append(inp)
    except BaseException:
        for inp in opened:
            inp.close()
        raise
    return opened


def _input_paths(inputs) -> list[str]:
    if not inputs:
        raise _option("inputs", "no input files given", "pass at least one .h5ad")
    paths = [os.path.abspath(os.fspath(p)) for p in inputs]
    seen = set()
    for p in paths:
        if p in seen:
            raise DataValidationError(p, "inputs", "input listed twice", "list each input once")
        seen.add(p)
    return paths


def _writer_options(format, chunk_cells, block_cells, cells_per_shard, codec=None) -> dict:
    """Writer keyword options for ``format``; options of the other format are an error."""
    zarr_opts = {"chunk_cells": chunk_cells, "codec": codec}
    wds_opts = {"block_cells": block_cells, "cells_per_shard": cells_per_shard}
    mine, other = (zarr_opts, wds_opts) if format == "zarr" else (wds_opts, zarr_opts)
    wrong = ["--" + k.replace("_", "-") for k, v in other.items() if v is not None]
    small = [f"--{k.replace('_', '-')}" for k, v in mine.items() if isinstance(v, int) and v < 1]
    if small:
        raise _option(small[0], "must be at least 1", "pass a positive number")
    if wrong and format in ("zarr", "webdataset"):
        raise _option(wrong[0], f"options {wrong} do not apply to --format {format}", "drop them")
    return {k: v for k, v in mine.items() if v is not None}


def _option(flag: str, problem: str, fix: str) -> DataValidationError:
    return DataValidationError("latentcell data build", flag, problem, fix)


def _check_options(hvg, combine_targets, genes_file, gene_join, read_cells) -> None:
    if hvg is not None and genes_file is not None:
        raise _option("--hvg", "--hvg and --genes are alternatives", "pass one of them")
    if combine_targets and hvg is None:
        raise _option(
            "--combine-targets",
            "adds perturbed genes to HVGs: it needs --hvg N",
            "pass --hvg N too",
        )
    if hvg is not None and hvg < 1:
        raise _option("--hvg", f"{hvg} genes", "pass at least 1")
    if gene_join not in GENE_JOINS:
        raise _option("--gene-join", repr(gene_join), f"use one of {GENE_JOINS}")
    if read_cells < 1:
        raise _option("--read-cells", str(read_cells), "pass at least 1")


def _check_scheduler(scheduler: str | None, workers: int | None) -> bool:
    """Whether ``scheduler`` asks for a distributed build (see ``build_store``)."""
    if scheduler in (None, "none"):
        if workers is not None and workers != 1:
            raise _option("--workers", "needs --scheduler processes", "pass --scheduler processes")
        return False
    if scheduler != "processes" and "://" not in scheduler:
        raise _option("--scheduler", repr(scheduler),
                      "pass none, processes or the address of a Dask scheduler (tcp://HOST:PORT)")  # fmt: skip
    if workers is not None and (workers < 1 or scheduler != "processes"):
        fix = ("pass at least 1" if scheduler == "processes"
               else "drop it: the cluster at --scheduler has its own workers")  # fmt: skip
        raise _option("--workers", f"{workers} with --scheduler {scheduler}", fix)
    return True


def _check_out(out, overwrite: bool) -> None:
    """Fail before any reading if ``out`` exists (the writer checks again when it starts)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise DataValidationError(
            path.absolute(),
            "--out",
            "the output path already exists",
            "choose another --out or pass --overwrite",
        )


def _input_record(inp: InputFile, plan: OrderedReadPlan) -> dict:
    return {
        "path": inp.path,
        "n_cells": inp.n_cells,
        "n_genes": inp.genes.n_genes,
        "schema": inp.roles.schema,
        "roles": inp.roles.as_dict(),
        "read_mode": plan.mode,
    }


# ---------------------------------------------------------------- CLI


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``latentcell data build``."""
    parser.add_argument("inputs", nargs="+", help="input .h5ad files")
    parser.add_argument("--out", required=True, help="store directory to create")
    parser.add_argument(
        "--format", choices=("zarr", "webdataset"), default="zarr", help="store format"
    )
    parser.add_argument(
        "--schema",
        choices=sorted(SCHEMAS),
        default="auto",
        help="column roles of the inputs (auto: detect from obs/var)",
    )
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument("--hvg", type=int, metavar="N", help="keep the N most variable genes")
    genes.add_argument("--genes", metavar="FILE", help="keep exactly these genes (one per line)")
    genes.add_argument(
        "--genes-from",
        metavar="STORE_OR_RUN",
        help="keep exactly the genes of this store or trained ST run, in its order",
    )
    parser.add_argument(
        "--combine-targets", action="store_true", help="add every perturbed gene to the HVGs"
    )
    parser.add_argument(
        "--hvg-sample-cells", type=int, metavar="N", help="compute HVGs on N random cells"
    )
    parser.add_argument(
        "--gene-join",
        choices=GENE_JOINS,
        default="union",
        help="genes of several inputs: all of them (zero-filled) or those in every input",
    )
    parser.add_argument("--pert-col", help="obs column of the perturbation (target gene)")
    parser.add_argument("--control", help="perturbation label of control cells")
    parser.add_argument("--batch-col", help="obs column of the batch")
    parser.add_argument("--cell-type-col", help="obs column of the cell type")
    parser.add_argument("--guide-col", help="obs column of the guide")
    parser.add_argument("--chunk-cells", type=int, help="zarr: cells per chunk")
    parser.add_argument(
        "--codec",
        choices=sorted(CODECS),
        help=f"zarr: compression of X (default {DEFAULT_CODEC}; 'none' streams ~1.3x faster "
        "from a ~2.3x larger store)",
    )
    parser.add_argument("--block-cells", type=int, help="webdataset: cells per sample")
    parser.add_argument("--cells-per-shard", type=int, help="webdataset: cells per shard")
    parser.add_argument(
        "--read-cells",
        type=int,
        default=DEFAULT_READ_CELLS,
        help="cells per read from an input",
    )
    parser.add_argument(
        "--spill-dir",
        help="where large inputs are sorted on disk (default: in the build's temporary "
        "directory beside --out)",
    )
    parser.add_argument(
        "--allow-non-integer", action="store_true", help="accept non-integer values in X"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument(
        "--scheduler",
        default="processes",
        metavar="none|processes|tcp://HOST:PORT",
        help="with several inputs, write each as its own part on a Dask worker: 'processes' "
        "starts --workers local processes, tcp://HOST:PORT uses a running Dask scheduler "
        "(e.g. on SLURM, launch/slurm/build_dask.sbatch); 'none' builds in this process",
    )
    parser.add_argument(
        "--workers", type=int, help="--scheduler processes: worker processes (default: CPUs)"
    )


def run_build(args: argparse.Namespace) -> int:
    """Run the build from parsed arguments; prints one line and returns the exit code."""
    start = time.perf_counter()
    path = build_store(
        args.inputs,
        args.out,
        format=args.format,
        schema=args.schema,
        hvg=args.hvg,
        combine_targets=args.combine_targets,
        genes_file=args.genes,
        genes_from=getattr(args, "genes_from", None),
        pert_col=args.pert_col,
        control=args.control,
        batch_col=args.batch_col,
        cell_type_col=args.cell_type_col,
        guide_col=args.guide_col,
        gene_join=args.gene_join,
        chunk_cells=args.chunk_cells,
        codec=args.codec,
        block_cells=args.block_cells,
        cells_per_shard=args.cells_per_shard,
        read_cells=args.read_cells,
        overwrite=args.overwrite,
        hvg_sample_cells=args.hvg_sample_cells,
        integer_counts=not args.allow_non_integer,
        spill_dir=args.spill_dir,
        scheduler=getattr(args, "scheduler", None),
        workers=getattr(args, "workers", None),
    )
    print(f"built {path} in {time.perf_counter() - start:.1f}s")
    return 0
