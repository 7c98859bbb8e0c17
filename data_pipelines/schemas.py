"""Column roles of an input h5ad: which obs column is the perturbation, the batch, the cell type.

Inputs come from different sources (Virtual Cell Challenge, scBaseCount, arbitrary h5ad), and
each names its columns differently. A ``Schema`` says which obs/var columns play which role;
``resolve_roles`` checks one input's obs against it and returns the concrete ``Roles``. Nothing
here reads files, so every rule is testable on small DataFrames.

A role whose column is absent (and not required) resolves to ``None``. The build then treats
the cell-type role specially: the store always has a cell-type column, and cells of an input
without one get the single implicit label ``IMPLICIT_LABEL`` ("unspecified"). Cells of an input
lacking a perturbation or batch column that another input has get the same label.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import pandas as pd

from latentcell.data_pipelines.errors import DataValidationError, LatentcellWarning

# Label for cells whose input has no column for a role that the store has (documented contract).
IMPLICIT_LABEL = "unspecified"

# Obs role names used throughout the build (guide is recorded but not a store role).
OBS_ROLES = ("perturbation", "batch", "cell_type", "guide")

# Var fields tried, in order, for Ensembl ids and for gene symbols.
GENE_ID_FIELDS = ("gene_id", "gene_ids", "ensembl_id", "gene_ensembl_id")
GENE_SYMBOL_FIELDS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name")

# Column names ``auto`` recognises per role (STATE / cell-load conventions, VCC, scBaseCount).
AUTO_CANDIDATES = {
    "perturbation": ("target_gene", "perturbation", "gene", "pert"),
    "batch": ("batch", "gem_group", "batch_var", "SRX_accession", "bio_rep", "replicate"),
    "cell_type": ("cell_type", "celltype"),
    "guide": ("guide_id", "guide", "sgRNA"),
}
# Control labels ``auto`` recognises, compared case-insensitively.
AUTO_CONTROL_LABELS = ("non-targeting", "non_targeting", "nontargeting", "control", "ctrl")

# CLI flag per obs role, so error messages can name the flag that fixes them.
ROLE_FLAGS = {
    "perturbation": "--pert-col",
    "batch": "--batch-col",
    "cell_type": "--cell-type-col",
    "guide": "--guide-col",
}


@dataclass(frozen=True)
class Schema:
    """Which obs/var columns play which role, and which roles an input must have.

    ``auto`` is True for the detecting schema: roles not set explicitly are looked up in
    ``AUTO_CANDIDATES`` per input. ``required`` lists obs roles whose column must exist.
    """

    name: str
    perturbation: str | None = None
    control: str | None = None
    batch: str | None = None
    cell_type: str | None = None
    guide: str | None = None
    gene_id_fields: tuple[str, ...] = GENE_ID_FIELDS
    gene_symbol_fields: tuple[str, ...] = GENE_SYMBOL_FIELDS
    var_index: str = "auto"  # "id" | "symbol" | "auto" (ids if the index looks like Ensembl ids)
    required: frozenset[str] = frozenset()
    auto: bool = False

    def column(self, role: str) -> str | None:
        return getattr(self, role)

    def with_overrides(
        self,
        pert_col: str | None = None,
        control: str | None = None,
        batch_col: str | None = None,
        cell_type_col: str | None = None,
        guide_col: str | None = None,
    ) -> Schema:
        """Apply CLI flags. A column named by a flag is required: the user asked for it."""
        cols = {
            "perturbation": pert_col,
            "batch": batch_col,
            "cell_type": cell_type_col,
            "guide": guide_col,
        }
        given = {role: col for role, col in cols.items() if col}
        changes: dict = dict(given)
        if control:
            changes["control"] = control
        changes["required"] = self.required | frozenset(given)
        return replace(self, **changes)


SCHEMAS: dict[str, Schema] = {
    "vcc": Schema(
        name="vcc",
        perturbation="target_gene",
        control="non-targeting",
        batch="batch",
        cell_type="cell_type",
        guide="guide_id",
        var_index="symbol",
        required=frozenset({"perturbation", "batch"}),
    ),
    "scbasecount": Schema(
        name="scbasecount",
        batch="SRX_accession",
        cell_type="cell_type",
        var_index="id",
        required=frozenset({"batch"}),
    ),
    "generic": Schema(name="generic"),
    "auto": Schema(name="auto", auto=True),
}


def get_schema(name: str, **overrides: str | None) -> Schema:
    """Built-in schema ``name`` with CLI overrides applied (see ``Schema.with_overrides``)."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; choose one of {sorted(SCHEMAS)}")
    return SCHEMAS[name].with_overrides(**overrides)


@dataclass(frozen=True)
class Roles:
    """One input's resolved obs roles (column names, or None where the input has none)."""

    schema: str
    perturbation: str | None
    control: str | None
    batch: str | None
    cell_type: str | None
    guide: str | None

    def column(self, role: str) -> str | None:
        return getattr(self, role)

    def as_dict(self) -> dict:
        return {
            "schema": self.schema,
            "perturbation": self.perturbation,
            "control": self.control,
            "batch": self.batch,
            "cell_type": self.cell_type,
            "guide": self.guide,
        }


def resolve_roles(schema: Schema, obs: pd.DataFrame, path: str) -> Roles:
    """Concrete role columns of one input; raises if a required one is missing or ambiguous."""
    columns = {role: _resolve_column(schema, role, obs, path) for role in OBS_ROLES}
    control = None
    if columns["perturbation"] is not None:
        control = _resolve_control(schema, obs[columns["perturbation"]], columns, path)
        if schema.auto and columns["batch"] is None:
            warnings.warn(
                f"{path}: schema 'auto' found no batch column (looked for "
                f"{', '.join(AUTO_CANDIDATES['batch'])}); the store gets no batch role, so "
                "controls are matched by cell type only. Pass --batch-col COLUMN if the data "
                "has batches",
                LatentcellWarning,
                stacklevel=2,
            )
    return Roles(schema=schema.name, control=control, **columns)


def _resolve_column(schema: Schema, role: str, obs: pd.DataFrame, path: str) -> str | None:
    """The explicit column if present, else (auto) the one matching candidate, else None."""
    explicit = schema.column(role)
    if explicit is not None:
        if explicit in obs.columns:
            return explicit
        if role in schema.required:
            raise DataValidationError(
                path,
                f"obs/{explicit}",
                f"missing obs column {explicit!r} that schema {schema.name!r} needs as "
                f"the {role} column (obs has: {_preview(obs.columns)})",
                f"pass {ROLE_FLAGS[role]} COLUMN naming the {role} column, or use --schema generic",
            )
        return None
    if not schema.auto:
        return None
    found = [c for c in AUTO_CANDIDATES[role] if c in obs.columns]
    if len(found) > 1:
        raise DataValidationError(
            path,
            "obs",
            f"schema 'auto' found several {role} columns {found}",
            f"pass {ROLE_FLAGS[role]} with the one to use",
        )
    return found[0] if found else None


def _resolve_control(schema: Schema, labels: pd.Series, columns: dict, path: str) -> str:
    """The control label, which must label at least one cell of a perturbation input."""
    col = columns["perturbation"]
    present = set(pd.unique(labels.dropna().astype(str)))
    if schema.control is not None:
        if schema.control not in present:
            raise DataValidationError(
                path,
                f"obs/{col}",
                f"no control cells: no cell has {col} == {schema.control!r} "
                f"(values include {_preview(sorted(present))})",
                "pass --control with the label of the control cells",
            )
        return schema.control
    known = sorted(v for v in present if v.lower() in AUTO_CONTROL_LABELS)
    if len(known) == 1:
        return known[0]
    problem = (
        f"several possible control labels {known}"
        if known
        else f"no control cells: none of {list(AUTO_CONTROL_LABELS)} occurs in {col}"
    )
    raise DataValidationError(
        path, f"obs/{col}", problem, "pass --control with the label of the control cells"
    )


def _preview(values, limit: int = 8) -> str:
    values = [str(v) for v in values]
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more
