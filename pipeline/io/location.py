"""Where a run's output lives: a local folder or a bucket, behind one path type.

An output, and what lies beside it (its lock, scratch space and reports), is a
:class:`upath.UPath`: for a local path that is a :class:`pathlib.Path` as before; for
``s3://BUCKET/KEY`` it is a key prefix of an object store, read and written through fsspec
(s3fs: credentials and endpoint from the usual AWS environment or files). Object stores have
no folders: a "folder" is every key under a prefix, so removing one removes those keys, and
listing it lists them in one request per thousand keys.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zarr
from upath import UPath
from zarr.storage import FsspecStore, LocalStore

__all__ = [
    "create_new",
    "file_sizes",
    "is_remote",
    "is_url",
    "is_web_url",
    "local_copy_of",
    "location",
    "remove_tree",
    "store_location",
]

#: Schemes of the URLs zarr reads through fsspec.
_URL_SCHEMES = frozenset({"http", "https", "s3"})


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL zarr reads through fsspec (``http://``, ``https://``,
    ``s3://``: credentials and endpoint from the usual AWS environment or files) rather than a
    local path."""
    if isinstance(path, UPath):
        return is_remote(path)
    return isinstance(path, str) and path.split("://", 1)[0] in _URL_SCHEMES and "://" in path


def is_web_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is served by a web server (``http://``, ``https://``): read-only, and it
    cannot be asked which files it holds (a bucket or a folder can)."""
    return is_url(path) and str(path).startswith(("http://", "https://"))


def location(path: str | os.PathLike) -> UPath:
    """The path ``path`` of an output: a local path, made absolute, or a URL."""
    text = str(path) if isinstance(path, UPath) else os.fspath(path)
    return UPath(text) if is_url(text) else UPath(Path(text).absolute())


def store_location(group: zarr.Group) -> UPath:
    """Where the zarr group ``group`` is stored: a local folder or a key prefix in a bucket
    (through the store's own file system options)."""
    store = group.store
    if isinstance(store, LocalStore):
        return UPath(Path(store.root, group.path))
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        protocol = protocol[0] if isinstance(protocol, tuple) else protocol
        options = {k: v for k, v in store.fs.storage_options.items() if k != "asynchronous"}
        return UPath(f"{protocol}://{store.path}", **options).joinpath(
            *[part for part in group.path.split("/") if part]
        )
    raise ValueError(f"no files behind a {type(store).__name__}")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in an object store rather than on a local file system."""
    return isinstance(path, UPath) and path.protocol not in ("", "file", "local")


def remove_tree(path: UPath) -> None:
    """Remove the folder (or key prefix) ``path`` and everything under it, if it exists."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Every file under ``folder`` (its path relative to ``folder``, POSIX style) and its size
    in bytes; one listing, no file opened. Empty when ``folder`` does not exist."""
    folder = location(folder)
    if not is_remote(folder):  # os.walk and strings: several times faster than fsspec's find
        base, sizes = os.fspath(folder), {}
        for root, _, names in os.walk(base):
            relative = os.path.relpath(root, base).replace(os.sep, "/")
            for name in names:
                key = name if relative == "." else f"{relative}/{name}"
                sizes[key] = os.stat(os.path.join(root, name)).st_size
        return sizes
    prefix = folder.path.rstrip("/") + "/"
    try:
        found = folder.fs.find(folder.path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        name[len(prefix) :]: int(info["size"])
        for name, info in found.items()
        if name.startswith(prefix) and info.get("type") == "file"
    }


def create_new(path: UPath, text: str) -> bool:
    """Write ``text`` to ``path`` only if nothing is there: True if written, False if the file
    existed. Atomic on a local file system (``O_EXCL``) and on S3 (a conditional write,
    ``If-None-Match: *``)."""
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.fs.open(path.path, "xb") as handle:
            handle.write(text.encode())
    except FileExistsError:
        return False
    return True


@contextmanager
def local_copy_of(folder: UPath) -> Iterator[Path]:
    """A local folder to write files for ``folder`` into: ``folder`` itself when it is local;
    for a bucket a temporary folder whose files are uploaded under ``folder`` when the context
    ends (also after an error: what was written is kept), then removed."""
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    local = Path(tempfile.mkdtemp(prefix="pipeline-upload-"))
    try:
        yield local
    finally:
        try:
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                target = folder.joinpath(*file.relative_to(local).parts)
                folder.fs.put_file(str(file), target.path)
        finally:
            shutil.rmtree(local, ignore_errors=True)
