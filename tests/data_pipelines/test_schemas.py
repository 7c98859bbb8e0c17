"""Schema role resolution: built-ins, CLI overrides, auto detection and its ambiguity errors."""

from __future__ import annotations

import pandas as pd
import pytest

from latentcell.data_pipelines.errors import DataValidationError
from latentcell.data_pipelines.schemas import SCHEMAS, get_schema, resolve_roles


def _obs(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame(columns, index=[f"c{i}" for i in range(n)])


VCC_OBS = _obs(
    target_gene=["non-targeting", "A", "B"], batch=["x", "y", "x"], guide_id=["g0", "g1", "g2"]
)


def test_vcc_roles_and_optional_cell_type():
    roles = resolve_roles(get_schema("vcc"), VCC_OBS, "f.h5ad")
    assert (roles.perturbation, roles.control, roles.batch) == (
        "target_gene",
        "non-targeting",
        "batch",
    )
    assert roles.guide == "guide_id" and roles.cell_type is None


def test_vcc_with_batch_override_like_papalexi():
    obs = VCC_OBS.rename(columns={"batch": "bio_rep"})
    with pytest.raises(DataValidationError, match="--batch-col"):
        resolve_roles(get_schema("vcc"), obs, "f.h5ad")
    roles = resolve_roles(get_schema("vcc", batch_col="bio_rep"), obs, "f.h5ad")
    assert roles.batch == "bio_rep"


def test_missing_required_column_names_file_field_fix():
    with pytest.raises(DataValidationError) as err:
        resolve_roles(get_schema("vcc"), VCC_OBS.drop(columns="target_gene"), "f.h5ad")
    assert err.value.path == "f.h5ad" and err.value.field == "obs/target_gene"
    assert "--pert-col" in err.value.fix


def test_flagged_column_becomes_required():
    schema = get_schema("vcc", cell_type_col="celltype")
    assert "cell_type" in schema.required
    with pytest.raises(DataValidationError, match="obs/celltype"):
        resolve_roles(schema, VCC_OBS, "f.h5ad")


def test_no_control_cells():
    obs = VCC_OBS.assign(target_gene=["A", "B", "A"])
    with pytest.raises(DataValidationError, match="no control cells"):
        resolve_roles(get_schema("vcc"), obs, "f.h5ad")
    roles = resolve_roles(get_schema("vcc", control="A"), obs, "f.h5ad")
    assert roles.control == "A"


def test_scbasecount():
    obs = _obs(SRX_accession=["SRX1"] * 2, cell_type=["T", "B"], umi_count_Unique=[5, 6])
    roles = resolve_roles(get_schema("scbasecount"), obs, "f.h5ad")
    assert (roles.perturbation, roles.control, roles.batch, roles.cell_type) == (
        None,
        None,
        "SRX_accession",
        "cell_type",
    )
    assert SCHEMAS["scbasecount"].var_index == "id"
    with pytest.raises(DataValidationError, match="SRX_accession"):
        resolve_roles(get_schema("scbasecount"), obs.drop(columns="SRX_accession"), "f.h5ad")


def test_generic_uses_only_flags():
    roles = resolve_roles(get_schema("generic"), VCC_OBS, "f.h5ad")
    assert (roles.perturbation, roles.batch, roles.cell_type) == (None, None, None)
    roles = resolve_roles(get_schema("generic", pert_col="target_gene"), VCC_OBS, "f.h5ad")
    assert roles.control == "non-targeting"  # detected when --control is not given


def test_auto_detects_known_columns():
    obs = VCC_OBS.assign(cell_type=["K562"] * 3)
    roles = resolve_roles(get_schema("auto"), obs, "f.h5ad")
    assert (roles.perturbation, roles.control, roles.batch, roles.cell_type, roles.guide) == (
        "target_gene",
        "non-targeting",
        "batch",
        "cell_type",
        "guide_id",
    )
    assert resolve_roles(get_schema("auto"), _obs(x=[1, 2]), "f.h5ad").perturbation is None


def test_auto_is_clear_when_ambiguous():
    with pytest.raises(DataValidationError, match="several perturbation columns") as err:
        resolve_roles(get_schema("auto"), VCC_OBS.assign(gene=["a", "b", "c"]), "f.h5ad")
    assert "--pert-col" in err.value.fix
    resolve_roles(
        get_schema("auto", pert_col="gene", control="a"),
        VCC_OBS.assign(gene=["a", "b", "c"]),
        "f.h5ad",
    )
    obs = VCC_OBS.assign(target_gene=["non-targeting", "control", "A"])
    with pytest.raises(DataValidationError, match="several possible control labels"):
        resolve_roles(get_schema("auto"), obs, "f.h5ad")


def test_unknown_schema():
    with pytest.raises(ValueError, match="unknown schema"):
        get_schema("nope")


def test_auto_finds_replicate_batches_and_warns_when_there_are_none():
    with_rep = VCC_OBS.drop(columns="batch").assign(bio_rep=["r1", "r2", "r1"])
    assert resolve_roles(get_schema("auto"), with_rep, "f.h5ad").batch == "bio_rep"
    without = VCC_OBS.drop(columns="batch")
    with pytest.warns(UserWarning, match="no batch column"):
        roles = resolve_roles(get_schema("auto"), without, "f.h5ad")
    assert roles.batch is None and roles.perturbation == "target_gene"
