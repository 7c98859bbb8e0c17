"""A bundle's metadata.json, written as an attacker would: file names that climb out with
``..``, absolute paths, symlinks that lead out, unknown components, and fields of the wrong
type. Each is refused with one DataValidationError naming metadata.json and the field, before
any file outside the bundle is hashed or loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from latentcell.data_pipelines.atomic import sha256_file
from latentcell.data_pipelines.errors import DataValidationError
from latentcell.export.runtime import Bundle


@pytest.fixture
def copy(bundles, tmp_path):
    """A writable copy of the DiT bundle at tmp/bundle, with tmp/elsewhere beside it holding
    a valid denoiser (what an escaping path would reach)."""
    target = shutil.copytree(bundles.dit, tmp_path / "bundle")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(target / "denoiser.onnx", tmp_path / "elsewhere" / "denoiser.onnx")
    return target


def edit(bundle: Path, change) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    change(meta)
    (bundle / "metadata.json").write_text(json.dumps(meta))


def rename_file(meta: dict, component: str, new: object) -> None:
    """Point ``component`` at ``new`` in both places a file name lives, keeping its hash."""
    old = meta["components"][component]["file"]
    meta["components"][component]["file"] = new
    if isinstance(new, str):
        meta["files"][new] = meta["files"].pop(old)


def refused(bundle: Path, field: str) -> str:
    with pytest.raises(DataValidationError) as caught:
        Bundle.load(bundle, threads=1)
    err = caught.value
    assert Path(err.path).name == "metadata.json" and err.field.startswith(field), str(err)
    return str(err)


ESCAPES = {
    "parent": "../elsewhere/denoiser.onnx",
    "parent inside": "sub/../../elsewhere/denoiser.onnx",
    "dot dot only": "..",
    "backslash": "..\\elsewhere\\denoiser.onnx",
    "drive": "C:/elsewhere/denoiser.onnx",
    "NUL": "denoiser.onnx\x00.txt",
    "empty": "",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_component_file_names_that_escape_are_refused(copy, name):
    edit(copy, lambda m: rename_file(m, "denoiser", ESCAPES[name]))
    refused(copy, "files." if ESCAPES[name] else "files")


def test_an_absolute_path_is_refused_even_when_it_is_the_bundle_itself(copy, tmp_path):
    for target in (tmp_path / "elsewhere" / "denoiser.onnx", copy / "denoiser.onnx"):
        edit(copy, lambda m, t=str(target): rename_file(m, "denoiser", t))
        assert "absolute" in refused(copy, "files.")


def test_a_component_file_outside_files_is_checked_too(copy):
    """The component's own ``file`` field goes through the rule even when ``files`` is
    clean (it is refused as an escape, not as a missing hash)."""

    def point_out(meta):
        meta["components"]["denoiser"]["file"] = "../elsewhere/denoiser.onnx"

    edit(copy, point_out)
    assert ".." in refused(copy, "components.denoiser.file")


@pytest.mark.parametrize("what", ["file", "directory"])
def test_symlinks_that_lead_out_are_refused(copy, tmp_path, what):
    outside = tmp_path / "elsewhere"
    if what == "file":
        (copy / "denoiser.onnx").unlink()
        os.symlink(outside / "denoiser.onnx", copy / "denoiser.onnx")
    else:
        os.symlink(outside, copy / "models")
        edit(copy, lambda m: rename_file(m, "denoiser", "models/denoiser.onnx"))
    assert "outside" in refused(copy, "files.")


def test_symlinks_inside_the_bundle_are_fine(copy):
    (copy / "real").mkdir()
    shutil.move(copy / "denoiser.onnx", copy / "real" / "denoiser.onnx")
    os.symlink(copy / "real" / "denoiser.onnx", copy / "denoiser.onnx")
    assert "denoiser" in Bundle.load(copy, threads=1)


def test_an_extra_recorded_file_outside_is_refused(copy, tmp_path):
    (tmp_path / "secret").write_text("x")
    edit(copy, lambda m: m["files"].__setitem__("../secret", sha256_file(tmp_path / "secret")))
    refused(copy, "files.../secret")


def test_an_unknown_component_is_refused(copy):
    def add(meta):
        meta["components"]["shell"] = dict(meta["components"]["denoiser"])

    edit(copy, add)
    assert "not a component" in refused(copy, "components.shell")


BAD_TYPES = {  # a change to the metadata -> the field the error names
    "metadata is a list": (lambda m: m.clear() or m.update({"format": 1}), "format"),
    "kind": (lambda m: m.__setitem__("kind", 3), "kind"),
    "format_version true": (lambda m: m.__setitem__("format_version", True), "format_version"),
    "source": (lambda m: m.__setitem__("source", "run"), "source"),
    "genes": (lambda m: m["genes"].__setitem__("gene_key", "ENSG1"), "genes.gene_key"),
    "gene key": (lambda m: m["genes"]["gene_key"].__setitem__(0, 7), "genes.gene_key"),
    "components": (lambda m: m.__setitem__("components", []), "components"),
    "no components": (lambda m: m.__setitem__("components", {}), "components"),
    "component": (
        lambda m: m["components"].__setitem__("denoiser", "x.onnx"),
        "components.denoiser",
    ),  # fmt: skip
    "file": (
        lambda m: m["components"]["denoiser"].__setitem__("file", ["a"]),
        "components.denoiser.file",
    ),  # fmt: skip
    "file missing": (
        lambda m: m["components"]["denoiser"].pop("file"),
        "components.denoiser.file",
    ),  # fmt: skip
    "inputs": (
        lambda m: m["components"]["denoiser"].__setitem__("inputs", []),
        "components.denoiser.inputs",
    ),  # fmt: skip
    "dtype": (
        lambda m: m["components"]["denoiser"]["inputs"]["x"].__setitem__("dtype", ["f"]),
        "components.denoiser.inputs.x.dtype",
    ),  # fmt: skip
    "shape": (
        lambda m: m["components"]["denoiser"]["inputs"]["x"].__setitem__("shape", 4),
        "components.denoiser.inputs.x.shape",
    ),  # fmt: skip
    "dimension": (
        lambda m: m["components"]["denoiser"]["inputs"]["x"]["shape"].append(True),
        "components.denoiser.inputs.x.shape",
    ),  # fmt: skip
    "outputs": (
        lambda m: m["components"]["denoiser"].__setitem__("outputs", [None]),
        "components.denoiser.outputs",
    ),  # fmt: skip
    "files": (lambda m: m.__setitem__("files", ["denoiser.onnx"]), "files"),
    "digest": (lambda m: m["files"].__setitem__("denoiser.onnx", 5), "files.denoiser.onnx"),
}


@pytest.mark.parametrize("name", list(BAD_TYPES))
def test_ill_typed_metadata_is_one_clear_error(copy, name):
    change, field = BAD_TYPES[name]
    edit(copy, change)
    refused(copy, field)


@pytest.mark.parametrize(
    "text", [b"[1, 2]", b"\xff\xfe{}", b"[" * 100_000, b'{"format": NaN', b"null"]
)
def test_metadata_that_is_not_a_json_object_is_refused(copy, text):
    (copy / "metadata.json").write_bytes(text)
    refused(copy, "json")
