"""Atomic publish of a directory, and the file hashes the manifests record."""

from __future__ import annotations

import hashlib

import pytest

from latentcell.data_pipelines.atomic import AtomicDir, sha256_file, sha256_tree
from latentcell.data_pipelines.errors import DataValidationError


def test_commit_renames_the_sibling_temp_dir(tmp_path):
    out = tmp_path / "sub" / "store"
    with AtomicDir(out) as build:
        assert build.tmp.parent == out.parent and build.tmp.name.startswith("store.tmp-")
        (build.tmp / "f").write_text("new")
        assert not out.exists()
        assert build.commit() == out
    assert (out / "f").read_text() == "new"
    assert [p.name for p in out.parent.iterdir()] == ["store"]


def test_exception_removes_the_temp_dir(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(KeyError), AtomicDir(out) as build:
        (build.tmp / "f").write_text("x")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_commit_publishes_nothing(tmp_path):
    with AtomicDir(tmp_path / "store") as build:
        (build.tmp / "f").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(DataValidationError) as err:
        AtomicDir(out)
    assert str(out) in str(err.value)
    assert "choose another --out or pass --overwrite" in str(err.value)
    assert list(tmp_path.iterdir()) == [out]  # no temp dir was made
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataValidationError, match="not a directory"):
        AtomicDir(tmp_path / "file", overwrite=True)


def test_overwrite_replaces_and_deletes_the_old_store_after(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old").write_text("old")
    with AtomicDir(out, overwrite=True) as build:
        (build.tmp / "new").write_text("new")
        assert (out / "old").exists()  # untouched until the new one is ready
        build.commit()
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_failed_overwrite_keeps_the_old_store(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ValueError), AtomicDir(out, overwrite=True) as build:
        (build.tmp / "new").write_text("new")
        raise ValueError("failed before commit")
    assert [p.name for p in out.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_sha256_helpers(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"hello")
    assert sha256_file(f) == hashlib.sha256(b"hello").hexdigest()
    root = tmp_path / "tree"
    (root / "c").mkdir(parents=True)
    (root / "c" / "0").write_bytes(b"x")
    (root / "zarr.json").write_bytes(b"{}")
    digest = sha256_tree(root)
    assert sha256_tree(root) == digest
    (root / "c" / "0").rename(root / "c" / "1")  # same bytes under another name
    assert sha256_tree(root) != digest
    (root / "c" / "1").rename(root / "c" / "0")
    assert sha256_tree(root) == digest
    (root / "c" / "0").write_bytes(b"y")
    assert sha256_tree(root) != digest


def test_killed_builds_are_cleaned_up_running_ones_are_not(tmp_path):
    """A build killed with SIGKILL leaves ``<out>.tmp-*`` behind; the next build of the same
    ``out`` removes it, but never the directory of a build still running (it holds a lock)."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "store"
    start = (
        "import sys, os, signal, time\n"
        "from latentcell.data_pipelines.atomic import AtomicDir\n"
        f"build = AtomicDir({str(out)!r})\n"
        "(build.tmp / 'part').write_text('half')\n"
        "print(build.tmp, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL) if sys.argv[1] == 'die' else time.sleep(60)\n"
    )
    running = subprocess.Popen([sys.executable, "-c", start, "live"], stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        live_tmp = running.stdout.readline().strip()
        killed = subprocess.run(
            [sys.executable, "-c", start, "die"], capture_output=True, text=True
        )
        assert killed.returncode == -signal.SIGKILL
        dead_tmp = killed.stdout.strip()
        assert {p.name for p in tmp_path.iterdir()} == {dead_tmp.split("/")[-1],
                                                        live_tmp.split("/")[-1]}  # fmt: skip
        with AtomicDir(out) as build:
            assert [str(p) for p in build.removed_stale] == [dead_tmp]
            build.commit()
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"store", live_tmp.split("/")[-1]}
    finally:
        running.kill()
        running.wait()
    with AtomicDir(tmp_path / "store", overwrite=True) as build:  # now it is stale too
        assert [str(p) for p in build.removed_stale] == [live_tmp]
