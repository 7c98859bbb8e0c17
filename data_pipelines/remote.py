"""Stores on object storage: read a built store from any fsspec URL, with the local checks.

Why this exists: a store is written once on local disk (``latentcell data build``; writing
to object storage is out of scope) and then copied to a bucket that many training nodes read.
The readers take a URL wherever they take a path: ``s3://bucket/cells.zarr``,
``gs://...``, ``https://host/cells.zarr``, or a chained URL with a local read cache
(``simplecache::s3://...``, ``filecache::https://...``; fsspec's own caching layers).

What a URL changes, and what it does not:

- Every integrity check of a local read still runs (the sealed manifest, each Zarr chunk's
  crc32c and its position, each shard's size and crc32c): the bytes travel through the
  network instead of the disk, they are checked the same way.
- No symlinks exist remotely, so a name from the manifest must only be a plain relative name
  (``safe_paths.check_relative_name``) before it is joined to the URL.
- A missing object or an unreachable server is one ``DataValidationError`` naming the URL;
  a missing chunk or shard of a store whose manifest was found is damage
  (``CorruptDataError``), as it is locally.
- Requests are slow (10-100 ms each), so the readers fetch the several chunk files of a
  read at once (:meth:`RemoteRoot.read_many`, concurrent inside fsspec) and the cell stream
  keeps several units in flight (``CellStreamConfig.fetch_units``).

Local paths never come here: the local readers keep their direct file reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DataValidationError

__all__ = ["RemoteRoot", "is_url", "join", "remote_error"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
INSTALL_FIX = 'install the remote extra (pip install "latentcell[remote]")'
# aiohttp's default waits 5 minutes for a silent server; a stalled read should fail instead
HTTP_TIMEOUT_S = float(os.environ.get("LATENTCELL_REMOTE_TIMEOUT", "60"))


def is_url(path) -> bool:
    """Whether ``path`` names a store by URL (``scheme://`` or a chained ``a::b://``)."""
    return isinstance(path, str) and (bool(_SCHEME.match(path)) or "::" in path)


def join(root, *names: str):
    """``root / name`` for a local path, ``root/name`` for a URL (Path would fold ``//``)."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *names])
    return Path(root).joinpath(*names)


def remote_error(url: str, err: BaseException) -> DataValidationError:
    """The one line for a failed request: missing, forbidden, unreachable or unsupported."""
    name = type(err).__name__
    if isinstance(err, DataValidationError):
        return err
    if isinstance(err, FileNotFoundError):
        return DataValidationError(
            url, "url", "not found (no such object, or the server answered 404)",
            "check the URL; pass the URL of a built store's directory",
        )  # fmt: skip
    if isinstance(err, PermissionError) or name in ("NoCredentialsError", "ClientError"):
        return DataValidationError(
            url, "url", f"access denied ({name}: {_short(err)})",
            "check the credentials for this bucket (e.g. AWS_PROFILE, AWS_ACCESS_KEY_ID)",
        )  # fmt: skip
    if isinstance(err, ImportError) or (
        isinstance(err, ValueError) and "protocol" in str(err).lower()
    ):  # an unknown scheme, or its fsspec package (s3fs, gcsfs) is not installed
        return DataValidationError(
            url, "url", f"cannot open this URL ({_short(err)})",
            f"use s3://, gs://, http(s):// or a local path; {INSTALL_FIX}",
        )  # fmt: skip
    return DataValidationError(
        url, "url", f"unreachable ({name}: {_short(err)})",
        "check the URL, the network and that the server is up",
    )  # fmt: skip


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or "no message"


def _options(url: str) -> dict:
    """Storage options for ``url``: a read timeout for plain HTTP(S) (see HTTP_TIMEOUT_S)."""
    if not url.split("::")[-1].startswith(("http://", "https://")) or "::" in url:
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=HTTP_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


class RemoteRoot:
    """A store directory behind a URL: the fsspec filesystem and the store's path in it.

    Picklable (the URL only; each process builds its own filesystem on first use), so the
    readers that hold one still cross into DataLoader workers.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._fs = None
        self._root = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "_fs": None, "_root": None}

    @property
    def fs(self):
        if self._fs is None:
            try:
                import fsspec

                self._fs, self._root = fsspec.core.url_to_fs(self.url, **_options(self.url))
            except Exception as err:  # noqa: BLE001 - unknown protocol, missing package
                raise remote_error(self.url, err) from err
            self._root = self._root.rstrip("/")
        return self._fs

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` (a relative name inside the store)."""
        self.fs  # noqa: B018 - sets _root
        return f"{self._root}/{name}" if name else self._root

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def read(self, name: str) -> bytes:
        """The bytes of ``name``; FileNotFoundError when the object is missing, any other
        failure a DataValidationError naming its URL."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - network, auth: one line naming the URL
            raise remote_error(self.url_of(name), err) from err

    def read_many(self, names: list[str]) -> list[bytes | None]:
        """The bytes of each name, fetched concurrently; None for a missing object."""
        if len(names) == 1:
            try:
                return [self.read(names[0])]
            except FileNotFoundError:
                return [None]
        paths = [self.path(n) for n in names]
        try:
            got = self.fs.cat(paths, on_error="return")
        except Exception as err:  # noqa: BLE001
            raise remote_error(self.url, err) from err
        out = []
        for name, path in zip(names, paths, strict=True):
            value = got.get(path, FileNotFoundError(path))
            if isinstance(value, FileNotFoundError):
                value = None
            elif isinstance(value, BaseException):
                raise remote_error(self.url_of(name), value) from value
            out.append(value)
        return out

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(name)))
        except Exception:  # noqa: BLE001 - only used to word an error better
            return False

    def zarr_store(self):
        """A read-only zarr store over the same URL. zarr needs an asynchronous filesystem:
        its own instance for async-native ones (HTTP, S3, GCS), and for chained caches (whose
        layers are synchronous) this one wrapped in threads."""
        from zarr.storage import FsspecStore

        try:
            from fsspec.asyn import AsyncFileSystem

            if isinstance(self.fs, AsyncFileSystem):  # (a cache layer proxies async_impl)
                return FsspecStore.from_url(
                    self.url, storage_options=_options(self.url) or None, read_only=True
                )
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            wrapped = AsyncFileSystemWrapper(self.fs, asynchronous=True)
            return FsspecStore(wrapped, read_only=True, path=self.path(""))
        except Exception as err:  # noqa: BLE001
            raise remote_error(self.url, err) from err
