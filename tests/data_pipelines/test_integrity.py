"""The integrity layer, attacked: damaged chunks and shards, edited and re-sealed manifests,
hostile tar members and names. Every case must end in a CorruptDataError naming the damaged
file (or, with on_corrupt="skip", in padded-out cells that are counted), never in wrong data."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from latentcell.data_pipelines.build import build_store
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.errors import CorruptDataError, DataValidationError
from latentcell.data_pipelines.integrity import crc32c, seal_manifest
from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig
from latentcell.data_pipelines.stores import open_store, verify_store
from latentcell.data_pipelines.synth import SynthConfig, synthesize

N_CELLS = 600


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small store per format: 100-cell Zarr chunks, 128-cell shards of 32-cell samples."""
    root = tmp_path_factory.mktemp("integrity")
    h5ad = root / "cells.h5ad"
    synthesize(
        SynthConfig(n_cells=N_CELLS, n_genes=60, n_perturbations=3, n_cell_types=2, seed=3), h5ad
    )
    zarr = build_store([h5ad], root / "z", format="zarr", schema="vcc", chunk_cells=100)
    wds = build_store(
        [h5ad], root / "w", format="webdataset", schema="vcc", block_cells=32, cells_per_shard=128
    )
    return {"zarr": Path(zarr), "webdataset": Path(wds)}


@pytest.fixture
def copy(built, tmp_path):
    def _copy(fmt: str) -> Path:
        return Path(shutil.copytree(built[fmt], tmp_path / fmt))

    return _copy


def read_everything(store: Path) -> None:
    """Open the store and read every unit, every row range and the group index."""
    reader = open_store(store, names=True)
    for unit in range(len(reader.meta.unit_sizes)):
        reader.read_unit(unit)
    reader.read_rows(0, reader.meta.n_cells)
    reader.group_index()


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x5A
    path.write_bytes(bytes(raw))


def reseal(store: Path, edit) -> None:
    """Edit the manifest like someone who knows the format: the seal is recomputed."""
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal_manifest(manifest)))


def test_intact_stores_read_and_verify(built):
    for store in built.values():
        read_everything(store)
        assert verify_store(store) == []


# -- Zarr chunks ---------------------------------------------------------------------------

ARRAYS = ["X/data", "X/indices", "X/indptr", "library_size", "obs/target_gene/codes",
          "obs/_names", "obs/_source_row"]  # fmt: skip


def chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("array", ARRAYS)
@pytest.mark.parametrize("damage", ["delete", "flip_first", "flip_middle", "flip_crc", "truncate",
                                    "empty", "append"])  # fmt: skip
def test_damaged_zarr_chunk_is_named(copy, array, damage):
    store = copy("zarr")
    files = chunk_files(store, array)
    target = files[len(files) // 2]
    if damage == "delete":
        target.unlink()
    elif damage.startswith("flip"):
        size = target.stat().st_size
        flip(target, {"flip_first": 0, "flip_middle": size // 2, "flip_crc": size - 1}[damage])
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(CorruptDataError) as err:
        read_everything(store)
    assert err.value.path.endswith(str(target.relative_to(store))) or err.value.path == str(
        store / "X" / "indptr"
    )
    assert "Fix:" in str(err.value) and "on_corrupt" in str(err.value)
    assert verify_store(store)  # the full check agrees


@pytest.mark.parametrize("array", ["X/data", "X/indptr", "library_size", "obs/target_gene/codes"])
def test_moved_zarr_chunk_is_caught(copy, array):
    """An intact chunk in the wrong place (a swap, or a copy over another) passes its own
    checksum; the table of checksums by position catches it."""
    store = copy("zarr")
    files = chunk_files(store, array)
    a, b = files[1], files[2]
    a.write_bytes(b.read_bytes())
    with pytest.raises(CorruptDataError, match="not the one written") as err:
        read_everything(store)
    assert err.value.path == str(a)


def test_every_zarr_chunk_is_written_and_checksummed(built):
    """All-zero chunks exist too (zarr skips them by default: they would read as zeros)."""
    store = built["zarr"]
    codes = chunk_files(store, "obs/_source_file/codes")
    assert len(codes) == N_CELLS // 100  # one input: every code is 0, still written
    meta = json.loads((store / "X" / "data" / "zarr.json").read_text())
    assert meta["codecs"][-1]["name"] == "crc32c"


def test_zarr_reads_through_zarr_itself_verify_too(copy):
    """Another Zarr reader (zarr-python) also refuses the damaged chunk: the checksum is the
    standard codec, not a private convention."""
    import zarr

    store = copy("zarr")
    target = chunk_files(store, "X/data")[0]
    flip(target, 10)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(store, mode="r")["X/data"][:]


# -- WebDataset shards ---------------------------------------------------------------------


def shard(store: Path, k: int = 1) -> Path:
    return store / f"shard-{k:06d}.tar"


@pytest.mark.parametrize("offset", [0, 100, 511, 512, 700, 2000, -1024, -1])
def test_flipped_byte_anywhere_in_a_shard(copy, offset):
    store = copy("webdataset")
    flip(shard(store), offset)
    with pytest.raises(CorruptDataError, match="checksum") as err:
        read_everything(store)
    assert err.value.path == str(shard(store))


@pytest.mark.parametrize("damage", ["truncate", "append", "delete", "empty"])
def test_shard_size_and_presence(copy, damage):
    store = copy("webdataset")
    path = shard(store, 2)
    raw = path.read_bytes()
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes({"truncate": raw[:1500], "append": raw + b"x" * 512, "empty": b""}[damage])
    with pytest.raises(CorruptDataError) as err:
        read_everything(store)
    assert err.value.path == str(path)


def rewrite_shard(store: Path, k: int, members) -> None:
    """Replace shard k by a tar of ``members`` [(TarInfo, bytes | None)] and re-seal the
    manifest with its new checksum: only the member checks can catch what follows."""
    path = shard(store, k)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, None if data is None else io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    raw = np.frombuffer(buf.getvalue(), np.uint8)

    def edit(manifest):
        entry = manifest["shards"][k]
        entry.update(crc32c=crc32c(raw), bytes=len(raw))

    reseal(store, edit)


def original_members(store: Path, k: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard(store, k)) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def info(name: str, kind=tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.size, i.linkname = kind, size, link
    return i


HOSTILE = {
    "symlink": lambda m: [m[0], (info(m[1][0].name, tarfile.SYMTYPE, link="/etc/passwd"), None),
                          *m[2:]],
    "hardlink": lambda m: [m[0], (info(m[1][0].name, tarfile.LNKTYPE, link=m[0][0].name), None),
                           *m[2:]],
    "directory": lambda m: [(info("000000000999", tarfile.DIRTYPE), None), *m],
    "absolute": lambda m: [(info("/" + m[0][0].name, size=len(m[0][1])), m[0][1]), *m[1:]],
    "dotdot": lambda m: [(info("../" + m[0][0].name, size=len(m[0][1])), m[0][1]), *m[1:]],
    "duplicate": lambda m: [m[0], m[0], *m[1:]],
    "extra_file": lambda m: [*m, (info("README.txt", size=2), b"hi")],
    "missing_sample": lambda m: [m[0], *m[2:]],
    "reordered": lambda m: [m[1], m[0], *m[2:]],
    "wrong_key": lambda m: [(info("000000000003.cells.npz", size=len(m[0][1])), m[0][1]), *m[1:]],
    "garbage_npz": lambda m: [(info(m[0][0].name, size=64), b"PK\x03\x04" + b"\0" * 60), *m[1:]],
    "bad_zip_crc": lambda m: [_sized(m[0][0].name, _bad_zip_crc(m[0][1])), *m[1:]],
    "no_samples": lambda m: [],
}  # fmt: skip


def _sized(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return info(name, size=len(data)), data


def _bad_zip_crc(npz: bytes) -> bytes:
    """The sample re-saved compressed (the fast parser hands it to np.load), then its zip
    CRC-32 fields damaged: np.load's own check fires."""
    with np.load(io.BytesIO(npz)) as z:
        arrays = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    raw = bytearray(buf.getvalue())
    central = raw.rfind(b"PK\x01\x02")  # last member's central directory entry
    raw[central + 16] ^= 0xFF  # its CRC-32
    return bytes(raw)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_shard_members_are_named(copy, case):
    store = copy("webdataset")
    rewrite_shard(store, 1, HOSTILE[case](original_members(store, 1)))
    with pytest.raises(CorruptDataError) as err:
        read_everything(store)
    assert err.value.path == str(shard(store, 1)), str(err.value)


# -- manifests -------------------------------------------------------------------------------

EDITS = {
    "n_cells": lambda m: m.update(n_cells=m["n_cells"] + 1),
    "n_cells_smaller": lambda m: m.update(n_cells=m["n_cells"] - 100),
    "nnz": lambda m: m.update(nnz=m["nnz"] + 7),
    "n_genes": lambda m: m.update(n_genes=m["n_genes"] - 1),
    "category_count": lambda m: m["category_counts"]["target_gene"].__setitem__(0, 10**9),
    "version_text": lambda m: m.update(version="2"),
    "drop_var": lambda m: m.pop("var"),
    "roles": lambda m: m["roles"].update(cell_type="nope"),
}
ZARR_EDITS = {"chunk_cells": lambda m: m.update(chunk_cells=50)}
WDS_EDITS = {
    "shard_n_cells": lambda m: m["shards"][1].update(n_cells=m["shards"][1]["n_cells"] * 50),
    "shard_first_row": lambda m: m["shards"][2].update(first_row=5),
    "shard_dropped": lambda m: m["shards"].pop(1),
    "shard_name_abs": lambda m: m["shards"][0].update(name="/etc/hostname"),
    "shard_name_dotdot": lambda m: m["shards"][0].update(name="../w/shard-000000.tar"),
    "groups_start": lambda m: m["groups"]["start"].__setitem__(1, 3),
    "shard_crc_type": lambda m: m["shards"][0].update(crc32c="0"),
}
CASES = [(f, e) for f in ("zarr", "webdataset") for e in EDITS] + [
    ("zarr", e) for e in ZARR_EDITS
] + [("webdataset", e) for e in WDS_EDITS]  # fmt: skip


@pytest.mark.parametrize(("fmt", "edit"), CASES)
@pytest.mark.parametrize("sealed", [False, True], ids=["edited", "resealed"])
def test_edited_manifest_is_caught_at_open(copy, fmt, edit, sealed):
    store = copy(fmt)
    change = {**EDITS, **ZARR_EDITS, **WDS_EDITS}[edit]
    if sealed:
        reseal(store, change)
    else:
        path = store / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    with pytest.raises(DataValidationError) as err:
        read_everything(store)
    assert "manifest.json" in err.value.path or "groups" in err.value.path, str(err.value)
    assert verify_store(store)


def test_unsealed_v2_manifest_is_refused(copy):
    store = copy("zarr")
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptDataError, match="manifest_sha256"):
        open_store(store)


def test_verify_never_hashes_outside_the_store(copy, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    store = copy("webdataset")
    reseal(store, lambda m: m["checksums"].update({"../secret.txt": "0" * 64}))
    problems = verify_store(store)
    assert any("outside" in p or ".." in p for p in problems), problems


def test_symlinked_shard_leading_out_is_refused(copy, tmp_path):
    store = copy("webdataset")
    target = shard(store, 0)
    moved = tmp_path / "elsewhere.tar"
    shutil.move(target, moved)
    target.symlink_to(moved)
    with pytest.raises(DataValidationError, match="outside"):
        open_store(store)


# -- the loaders: stop, or skip when asked --------------------------------------------------


def damaged_zarr(copy) -> tuple[Path, Path]:
    store = copy("zarr")
    target = chunk_files(store, "X/indices")[2]
    flip(target, 5)
    return store, target


def epoch(stream: CellStream) -> tuple[list[dict], object]:
    loader = stream.loader()
    return list(loader), loader


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_stops_at_damage_naming_the_file(copy, workers):
    store, target = damaged_zarr(copy)
    from functools import partial

    stream = CellStream(partial(open_store, store), CellStreamConfig(batch_size=64, seed=1),
                        rank=0, world_size=1, num_workers=workers)  # fmt: skip
    with pytest.raises(CorruptDataError) as err:
        epoch(stream)
    assert err.value.path == str(target)


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
@pytest.mark.parametrize("workers", [0, 1])
def test_stream_skips_when_asked(copy, fmt, workers, capsys):
    store = copy(fmt)
    target = chunk_files(store, "X/indices")[2] if fmt == "zarr" else shard(store, 2)
    flip(target, 77)
    from functools import partial

    def stream(on_corrupt):
        config = CellStreamConfig(batch_size=64, seed=1, on_corrupt=on_corrupt)
        return CellStream(partial(open_store, store), config, rank=0, world_size=1,
                          num_workers=workers)  # fmt: skip

    batches, loader = epoch(stream("skip"))
    rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for b in batches])
    reader = open_store(store)
    sizes = reader.meta.unit_sizes
    # every cell of every intact unit once; none of the damaged unit's; batches unchanged
    assert len(rows) == len(set(rows.tolist())) == N_CELLS - len(_damaged_rows(store, target))
    assert not set(rows.tolist()) & _damaged_rows(store, target)
    assert len(batches) == -(-N_CELLS // 64) and sum(sizes) == N_CELLS
    assert [u["file"] for u in loader.corrupt_units()] == [str(target)]
    err = capsys.readouterr().err
    assert err.count("warning: skipping damaged data") == 1 and str(target) in err
    # the next epoch skips it again, silently (already reported)
    loader.set_epoch(1)
    assert len(list(loader)) == len(batches) and loader.corrupt_units()[0]["file"] == str(target)
    assert "warning" not in capsys.readouterr().err


def _damaged_rows(store: Path, target: Path) -> set[int]:
    """Rows whose data lives in the damaged file (read from the intact copy's layout)."""
    manifest = json.loads((store / "manifest.json").read_text())
    if manifest["format"] == "webdataset":
        k = int(target.name.split("-")[1].split(".")[0])
        s = manifest["shards"][k]
        return set(range(s["first_row"], s["first_row"] + s["n_cells"]))
    # zarr X/indices chunk i: entries [i*nnz_chunk, (i+1)*nnz_chunk) -> the cell chunks
    # (read units) whose entries overlap it
    import zarr

    indptr = zarr.open_group(store, mode="r")["X/indptr"][:]
    k = int(target.name)
    lo, hi = k * manifest["nnz_chunk"], (k + 1) * manifest["nnz_chunk"]
    c = manifest["chunk_cells"]
    units = {r // c for r in range(manifest["n_cells"]) if indptr[r] < hi and indptr[r + 1] > lo}
    return {r for u in units for r in range(u * c, min((u + 1) * c, manifest["n_cells"]))}


def test_set_sampler_pads_out_sets_touching_damage(copy):
    store, target = damaged_zarr(copy)
    config = SetSamplerConfig(set_size=16, seed=0, on_corrupt="skip", buffer_sets=4)
    sampler = SetSampler(open_store(store), config, rank=0, world_size=1)
    loader = sampler.loader()
    pairs = list(loader)
    damaged = _damaged_rows(store, target)
    assert [u["file"] for u in loader.corrupt_units()] == [str(target)]
    for pair in pairs:
        rows = set(pair["perturbed"]["row"].tolist()) | set(pair["control"]["row"].tolist())
        if not pair["is_pad"]:
            assert not rows & damaged and -1 not in rows
    assert any(p["is_pad"] for p in pairs)
    with pytest.raises(CorruptDataError):
        list(
            SetSampler(
                open_store(store), SetSamplerConfig(set_size=16), rank=0, world_size=1
            ).loader()
        )
