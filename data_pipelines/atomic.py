"""Publish a store directory all at once, and hash the files in it.

A store is built in ``<out>.tmp-<hex>`` beside ``<out>`` and renamed into place only when
complete, so a reader never sees a half-written store under the real name and an interrupted
build leaves nothing at ``<out>`` (the temporary directory is removed on any exception; a
killed process may leave one behind, which ``open_store`` rejects because it has no
manifest). Renaming a directory is atomic on one POSIX file system; that is why the
temporary path is a sibling and not somewhere under ``/tmp``.

With ``overwrite=True`` the old store is first renamed aside and deleted only after the new
one is in place, so a failure at any step leaves either the old or the new store readable.

A build holds an exclusive ``flock`` on ``<tmp>/.building`` while it runs. A killed build
leaves its temporary directory behind, but not its lock (the kernel drops locks with the
process), so the next build of the same ``out`` removes every ``<out>.tmp-*`` whose lock it
can take, and never one a build still running holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from .errors import DataValidationError

_HASH_BLOCK = 1 << 20


class AtomicDir:
    """A temporary directory that becomes ``out`` on :meth:`commit`.

    Usage::

        with AtomicDir(out, overwrite=False) as build:
            ...write files under build.tmp...
            final = build.commit()                  # before leaving the block

    Leaving the ``with`` block without ``commit`` (by an exception or otherwise) removes the
    temporary directory and leaves ``out`` untouched.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self._check_destination()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.removed_stale = remove_stale_builds(self.out)
        self.tmp = self.out.parent / f"{self.out.name}.tmp-{secrets.token_hex(6)}"
        self.tmp.mkdir()
        self._lock = _lock(self.tmp)
        self.committed = False

    def _check_destination(self) -> None:
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise DataValidationError(
                    self.out,
                    "--out",
                    "the output path already exists",
                    "choose another --out or pass --overwrite",
                )
            if not self.out.is_dir() or self.out.is_symlink():
                raise DataValidationError(
                    self.out,
                    "--out",
                    "the output path exists and is not a directory, refusing to replace it",
                    "choose another --out or remove that file",
                )

    def commit(self) -> Path:
        """Rename the temporary directory to ``out``; returns ``out``."""
        if self.committed:
            return self.out
        self._check_destination()
        self._unlock()
        old = None
        if self.out.exists():
            old = self.out.parent / f"{self.out.name}.old-{secrets.token_hex(6)}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)
            raise
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory (idempotent; a no-op after commit)."""
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            (self.tmp / _LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> AtomicDir:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


_LOCK_NAME = ".building"


def _lock(directory: Path) -> int:
    """An exclusive flock on ``directory/.building``, held until the descriptor closes."""
    fd = os.open(directory / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale_builds(out: Path) -> list[Path]:
    """Remove the ``<out>.tmp-*`` directories of builds that died (nobody holds their lock);
    returns what was removed. A directory without a lock file is left alone: it is not ours,
    or a build is between creating it and locking it."""
    removed = []
    for tmp in sorted(out.parent.glob(f"{out.name}.tmp-*")):
        lock_file = tmp / _LOCK_NAME
        if tmp.is_symlink() or not tmp.is_dir() or not lock_file.is_file():
            continue
        try:
            fd = os.open(lock_file, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a build is running
            os.close(fd)
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike) -> str:
    """Hex sha256 over every file under ``root``, in sorted relative-path order.

    Each file contributes its relative POSIX path, a NUL byte, its size and its bytes, so a
    renamed, missing, truncated or altered file all change the digest. Used for Zarr arrays,
    which are a directory of chunk files each.
    """
    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel in files:
        path = root / rel
        h.update(rel.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


class AtomicWriter:
    """The StoreWriter lifecycle both store formats share.

    ``append`` and ``finish`` refuse to run after the writer ended; any exception inside them
    aborts (the temporary build is removed, the destination untouched); leaving a ``with``
    block without ``finish`` aborts. Subclasses implement ``_append(block)``, ``_finish() ->
    path`` (publishes) and ``_discard()`` (drops the temporary build).
    """

    _done = False
    _atomic: AtomicDir

    @property
    def scratch(self) -> Path:
        """The build's temporary directory (scratch files there vanish with a failed build)."""
        return self._atomic.tmp

    @property
    def removed_stale(self) -> list[Path]:
        """Temporary directories of killed builds of the same ``out`` removed at start."""
        return self._atomic.removed_stale

    def append(self, block) -> None:
        """Add ``block`` as the next rows (its ``rows`` are ignored: rows are assigned here).

        The writer buffers the block's arrays without copying: do not modify them afterwards.
        """
        self._guarded("append", self._append, block)

    def finish(self) -> str:
        path = self._guarded("finish", self._finish)
        self._done = True
        return str(path)

    def abort(self) -> None:
        self._done = True
        self._discard()

    def _guarded(self, action: str, fn, *args):
        if self._done:
            raise RuntimeError(f"{action} after finish/abort")
        try:
            return fn(*args)
        except BaseException:
            self.abort()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """``payload`` as JSON at ``path``, written to a temporary sibling and then renamed, so a
    reader never sees half a file (NaN is refused: it is not JSON)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_h5ad_atomic(adata, out: str | os.PathLike) -> Path:
    """Write ``out`` via a temporary sibling file and a rename: never half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
