"""h5ad -> store -> loader, through the real CLI, real stores, real DataLoader workers and
real processes: the guarantees users rely on, checked on the whole path at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentcell.data_pipelines.batches import to_dense
from latentcell.data_pipelines.cell_stream import CellStream, CellStreamConfig
from latentcell.data_pipelines.stores import open_store

FORMATS = ("zarr", "webdataset")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "latentcell.launch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"latentcell {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "vcc.h5ad"
    cli("data", "synth", "--out", out, "--schema", "vcc", "--cells", 3001, "--genes", 300,
        "--perturbations", 6, "--cell-types", 2, "--batches", 3, "--seed", 7)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def stores(synthetic, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    built = {}
    for fmt in FORMATS:
        built[fmt] = root / f"store.{fmt}"
        sizes = ("--chunk-cells", 250) if fmt == "zarr" else ("--block-cells", 100)
        cli("data", "build", synthetic, "--out", built[fmt], "--format", fmt, "--schema", "vcc",
            *sizes)  # fmt: skip
    return built


def stream_epoch(store: Path, **kwargs) -> list[dict]:
    config = CellStreamConfig(batch_size=128, seed=3, numeric_columns=("_source_row",))
    stream = CellStream(partial(open_store, store), config, **kwargs)
    return list(stream.loader())


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_inspect_reports_the_contract_fields(stores, fmt):
    summary = json.loads(cli("data", "inspect", stores[fmt], "--json").stdout)
    assert summary["format"] == fmt
    assert summary["n_cells"] == 3001 and summary["n_genes"] == 300
    assert {"target_gene", "guide_id", "batch", "cell_type"} <= set(summary["obs_columns"])
    # 2 cell types x (6 targets + control) x 3 batches, when every combination occurs
    assert 0 < summary["n_groups"] <= 2 * 7 * 3
    assert cli("data", "verify", stores[fmt]).returncode == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_round_trip_through_the_loader(synthetic, stores, fmt):
    """Every input cell comes back from the stream once, with identical counts, obs and var."""
    source = ad.read_h5ad(synthetic)
    reader = open_store(stores[fmt])
    batches = stream_epoch(stores[fmt])
    real = [b for b in batches if not b["is_pad"].all()]
    keep = [~b["is_pad"] for b in real]
    src_rows = np.concatenate(
        [
            b["numeric"]["_source_row"][k].numpy().astype(np.int64)
            for b, k in zip(real, keep, strict=True)
        ]
    )
    assert np.array_equal(np.sort(src_rows), np.arange(source.n_obs))
    X = torch.cat([to_dense(b)[k] for b, k in zip(real, keep, strict=True)]).numpy()
    assert np.array_equal(X, source.X[src_rows].toarray())
    libsize = torch.cat([b["library_size"][k] for b, k in zip(real, keep, strict=True)]).numpy()
    assert np.allclose(libsize, X.sum(1))
    for column in ("target_gene", "guide_id", "batch", "cell_type"):
        codes = torch.cat([b["obs"][column][k] for b, k in zip(real, keep, strict=True)]).numpy()
        labels = np.asarray(reader.meta.categories[column])[codes]
        assert np.array_equal(labels, source.obs[column].astype(str).to_numpy()[src_rows])
    assert list(reader.meta.var["gene_symbol"]) == list(source.var_names)
    assert list(reader.meta.var["gene_id"]) == list(source.var["gene_id"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_two_workers_see_every_cell_exactly_once(stores, fmt):
    per_rank = [
        stream_epoch(stores[fmt], rank=rank, world_size=2, num_workers=2) for rank in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1])  # tail="pad": no DDP hang
    rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for bs in per_rank for b in bs])
    assert np.array_equal(np.sort(rows), np.arange(3001))


def _rank_main(rank: int, world: int, store: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = stream_epoch(Path(store), num_workers=1)  # rank and world from the group
        rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for b in batches])
        counts = torch.tensor([len(batches)])
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(gathered, counts)
        np.save(f"{out}/rank{rank}.npy", rows)
        np.save(f"{out}/counts{rank}.npy", torch.cat(gathered).numpy())
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_run_splits_the_store(stores, tmp_path):
    """Two real processes in one gloo process group take their rank from torch.distributed."""
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(2, str(stores["zarr"]), str(tmp_path), port), nprocs=2)
    rows = [np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)]
    assert not set(rows[0]) & set(rows[1])
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(3001))
    counts = np.load(tmp_path / "counts0.npy")
    assert counts[0] == counts[1]


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(synthetic, tmp_path):
    out = tmp_path / "never.zarr"
    missing = cli("data", "build", tmp_path / "absent.h5ad", "--out", out, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error:") and "absent.h5ad" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    wrong_col = cli("data", "build", synthetic, "--out", out, "--schema", "vcc",
                    "--batch-col", "no_such_column", check=False)  # fmt: skip
    assert wrong_col.returncode == 2 and "no_such_column" in wrong_col.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("never.zarr*"))


@pytest.mark.real_data
def test_papalexi_builds_and_streams(shared_file, tmp_path):
    path = shared_file("papalexi2021_thp1_sceptre_lowmoi.h5ad")
    store = tmp_path / "papalexi.zarr"
    cli("data", "build", path, "--out", store, "--format", "zarr", "--schema", "vcc",
        "--batch-col", "bio_rep", "--hvg", 200, "--combine-targets")  # fmt: skip
    summary = json.loads(cli("data", "inspect", store, "--json").stdout)
    assert summary["n_cells"] == 20729
    assert summary["roles"]["batch"] == "bio_rep"
    meta = open_store(store).meta
    targets = set(meta.categories["target_gene"]) - {"non-targeting"}
    assert len(targets) == 25  # the file holds 25 targets plus the non-targeting control
    measured_targets = targets & set(ad.read_h5ad(path, backed="r").var_names)
    assert len(measured_targets) == 9  # combined HVGs keep every measured target
    assert measured_targets <= set(meta.var["gene_symbol"]) and meta.n_genes >= 200
    batches = stream_epoch(store, num_workers=0)
    rows = np.concatenate([b["row"][~b["is_pad"]].numpy() for b in batches])
    assert np.array_equal(np.sort(rows), np.arange(20729))


def test_codec_choice_changes_bytes_not_cells(synthetic, stores, tmp_path):
    plain = tmp_path / "plain.zarr"
    cli("data", "build", synthetic, "--out", plain, "--format", "zarr", "--schema", "vcc",
        "--chunk-cells", 250, "--codec", "none")  # fmt: skip
    assert open_store(plain).meta.manifest["codec"] == "none"
    for a, b in zip(stream_epoch(plain), stream_epoch(stores["zarr"]), strict=True):
        assert torch.equal(a["row"], b["row"]) and torch.equal(to_dense(a), to_dense(b))


def test_resume_and_determinism_over_a_real_store_with_workers(stores):
    """Kill mid-epoch, resume from the loader's state: the epoch is unchanged, batch for batch."""
    config = CellStreamConfig(batch_size=96, seed=11)

    def loader(state=None):
        stream = CellStream(partial(open_store, stores["zarr"]), config, num_workers=2)
        stream.set_epoch(1)
        out = stream.loader()
        if state is not None:
            out.load_state_dict(state)
        return out

    full = [b["row"] for b in loader()]
    assert all(torch.equal(a, b["row"]) for a, b in zip(full, loader(), strict=True))
    first = loader()
    head = []
    for batch in first:
        head.append(batch["row"])
        if len(head) == 7:
            break
    state = first.state_dict()
    tail = [b["row"] for b in loader(state)]
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))


@pytest.mark.real_data
def test_papalexi_sets_match_controls_by_batch(shared_file, tmp_path):
    from latentcell.data_pipelines.set_sampler import SetSampler, SetSamplerConfig

    path = shared_file("papalexi2021_thp1_sceptre_lowmoi.h5ad")
    store = tmp_path / "papalexi.zarr"
    cli("data", "build", path, "--out", store, "--schema", "vcc", "--batch-col", "bio_rep")
    reader = open_store(store)
    control = reader.meta.categories["target_gene"].index("non-targeting")
    sampler = SetSampler(partial(open_store, store), SetSamplerConfig(set_size=64, seed=0))
    pairs = [p for p, _ in zip(sampler.loader(), range(40), strict=False)]
    for pair in pairs:
        pert, ctrl = pair["perturbed"]["obs"], pair["control"]["obs"]
        assert (pert["perturbation"] == pair["perturbation"]).all()
        assert pair["perturbation"] != control and (ctrl["perturbation"] == control).all()
        assert pair["match_level"] == "batch"  # every bio_rep has controls
        assert torch.equal(ctrl["batch"], pert["batch"])  # matched cell by cell
