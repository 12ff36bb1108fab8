"""The landing location: where new batches arrive, read through fsspec.

A landing location is a local folder (the default) or any fsspec URL (``s3://bucket/in``,
``gcs://...``, ``memory://landing`` ...). Each entry directly inside it is one batch:
a ``.npz`` / ``.pt`` / ``.pth`` file, or a sub-folder holding an ImageFolder tree. Entries
whose name starts with ``.`` or ``_`` are ignored, so a producer can write a batch under a
hidden name and rename it when it is complete (a half-written batch is never picked up),
and the default archive ``_archive`` inside the landing location is not a batch.
Every other entry is reported, whatever its suffix: a stray file then fails with a reason
instead of being silently ignored.

Listing reads metadata only: each entry comes with a *signature* (its kind, size and
modification time, or etag on object stores), so a poll can skip the entries it already
knows without opening them. Local entries are examined with ``lstat``: a symbolic link or
a special file (fifo, socket, device) is reported as such and never followed or opened,
and :func:`refusal` says why such an entry, or an empty one, is not a batch.

Local entries are used in place; remote ones are copied to a temporary folder first,
because the batch readers (numpy, torch, torchvision's ImageFolder) need local files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiftcost.errors import ConfigError, InputError

__all__ = [
    "LandedBatch",
    "archive_location",
    "describe",
    "discover",
    "fingerprint",
    "is_local",
    "join",
    "local_copy",
    "move",
    "placeholder_fingerprint",
    "refusal",
    "remove",
]

_LOCAL_PROTOCOLS = frozenset({"file", "local"})

#: Metadata fields of fsspec filesystems that change when an object's bytes do, best first.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "md5", "crc32c", "generation", "version_id", "mtime", "LastModified", "last_modified", "updated", "created")

_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a fifo (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class LandedBatch:
    """One entry of the landing location, from its metadata alone.

    ``kind`` is ``file``, ``folder``, ``link`` (a symbolic link, never followed) or
    ``special`` (``special`` says which: fifo, socket, device). ``signature`` changes when
    the entry's bytes do: kind, size and modification time, or etag on object stores.
    """

    uri: str
    name: str
    kind: str
    signature: str
    size: int | None = None
    special: str | None = None

    @property
    def is_folder(self) -> bool:
        return self.kind == "folder"


def _filesystem(location: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(location)
    except (ImportError, ValueError) as error:
        raise ConfigError(
            f"The landing location {location!r} cannot be opened ({error}); use a local folder or an fsspec URL "
            "whose filesystem is installed."
        ) from None


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a local path (a plain path or a ``file://`` URL)."""
    protocol = _filesystem(uri)[0].protocol
    protocols = {protocol} if isinstance(protocol, str) else set(protocol)
    return bool(protocols & _LOCAL_PROTOCOLS)


def _local_path(uri: str) -> str:
    return os.path.abspath(_filesystem(uri)[1])


def _ignored(name: str) -> bool:
    return not name or name.startswith((".", "_"))


# ----------------------------------------------------------------------------- listing


def _local_entry(path: str, status: os.stat_result) -> LandedBatch:
    """A local entry from its ``lstat``: a link is a link, whatever it points to."""
    mode = status.st_mode
    special = next((what for test, what in _SPECIAL_KINDS if test(mode)), None)
    if stat.S_ISLNK(mode):
        kind = "link"
    elif stat.S_ISDIR(mode):
        kind = "folder"
    elif stat.S_ISREG(mode):
        kind = "file"
    else:
        kind, special = "special", special or "a special file"
    signature = f"{kind}:{status.st_size}:{status.st_mtime_ns}"
    return LandedBatch(uri=path, name=os.path.basename(path), kind=kind, signature=signature, size=status.st_size, special=special)


def _remote_entry(fs: Any, info: dict[str, Any]) -> LandedBatch:
    path = str(info["name"]).rstrip("/")
    kind = {"file": "file", "directory": "folder"}.get(str(info.get("type")), "special")
    size = info.get("size")
    versions = "|".join(f"{key}={info[key]}" for key in _VERSION_KEYS if info.get(key) is not None)
    signature = f"{kind}:{size}:{versions}"
    if len(signature) > 200:  # keep the column bounded whatever a filesystem reports
        signature = f"{kind}:{size}:sha256={hashlib.sha256(versions.encode()).hexdigest()}"
    return LandedBatch(
        uri=fs.unstrip_protocol(path),
        name=path.rsplit("/", 1)[-1],
        kind=kind,
        signature=signature,
        size=None if size is None else int(size),
        special=None if kind != "special" else f"an entry of type {info.get('type')!r}",
    )


def discover(location: str) -> list[LandedBatch]:
    """Every entry now in the landing ``location``, sorted by name; metadata only, no bytes read.

    A missing local folder is created (an empty landing area is normal); a missing remote
    location is a ``ConfigError``.
    """
    fs, root = _filesystem(location)
    if is_local(location):
        root = os.path.abspath(root)
        Path(root).mkdir(parents=True, exist_ok=True)
        found = []
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    if _ignored(entry.name):
                        continue
                    try:
                        found.append(_local_entry(entry.path, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:  # removed while listing
                        continue
        except OSError as error:
            raise ConfigError(f"The landing location {location} cannot be listed ({error.strerror or error}); check its permissions.") from None
        return sorted(found, key=lambda batch: batch.name)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise ConfigError(f"The landing location {location} does not exist; create it or fix SHIFTCOST_LANDING.") from None
    except OSError as error:
        raise ConfigError(f"The landing location {location} cannot be listed ({error}); check its permissions.") from None
    found = []
    for info in entries:
        path = str(info["name"]).rstrip("/")
        if path == root.rstrip("/") or _ignored(path.rsplit("/", 1)[-1]):
            continue
        found.append(_remote_entry(fs, info))
    return sorted(found, key=lambda batch: batch.name)


def describe(uri: str) -> LandedBatch:
    """The entry at ``uri`` (as :func:`discover` would list it); ``InputError`` when it is missing."""
    if is_local(uri):
        path = _local_path(uri)
        try:
            return _local_entry(path, os.lstat(path))
        except FileNotFoundError:
            raise InputError(f"Batch {uri} does not exist; check the path.") from None
    fs, path = _filesystem(uri)
    try:
        return _remote_entry(fs, fs.info(path))
    except FileNotFoundError:
        raise InputError(f"Batch {uri} does not exist; check the path.") from None


# ----------------------------------------------------------------------------- what is not a batch


def refusal(landed: LandedBatch) -> str | None:
    """Why the entry is not a batch before any of its bytes is read (None when it may be one).

    Links and special files are refused without being followed or opened; so are empty
    files and folders without a byte in them, and folders holding links or special files.
    """
    if landed.kind == "link":
        return (
            f"Batch {landed.uri} is a symbolic link; the landing area takes only regular files and folders "
            "and never follows links, so copy or move the data itself into it."
        )
    if landed.kind == "special":
        return f"Batch {landed.uri} is {landed.special}, not a regular file or folder; it was not opened: remove it and land the data as a file or folder."
    if landed.kind == "file" and landed.size == 0:
        return f"Batch {landed.uri} is an empty file; land the whole batch (write it under a hidden name, then rename it)."
    if landed.kind == "folder":
        return _folder_refusal(landed.uri)
    return None


def _folder_refusal(uri: str) -> str | None:
    if is_local(uri):
        root = _local_path(uri)
        found_bytes = False
        pending = [root]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    inner = _local_entry(entry.path, entry.stat(follow_symlinks=False))
                    relative = os.path.relpath(entry.path, root)
                    if inner.kind == "link":
                        return f"Batch {uri} holds a symbolic link ({relative}); the landing area never follows links, so copy the data itself into the folder."
                    if inner.kind == "special":
                        return f"Batch {uri} holds {inner.special} ({relative}), which was not opened; remove it from the folder."
                    if inner.kind == "folder":
                        pending.append(entry.path)
                    found_bytes = found_bytes or (inner.kind == "file" and bool(inner.size))
    else:
        fs, path = _filesystem(uri)
        found = fs.find(path, withdirs=True, detail=True)
        for name, info in found.items():
            if info.get("type") not in ("file", "directory"):
                return f"Batch {uri} holds an entry of type {info.get('type')!r} ({name}), which was not opened; remove it from the folder."
        found_bytes = any(info.get("type") == "file" and info.get("size") for info in found.values())
    if not found_bytes:
        return f"Batch {uri} is an empty folder (no file in it holds a byte); land the whole batch (write it under a hidden name, then rename it)."
    return None


# ----------------------------------------------------------------------------- reading


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the batch at ``uri``: the path itself, or a temporary copy."""
    if is_local(uri):
        yield Path(_filesystem(uri)[1])
        return
    fs, path = _filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="shiftcost-batch-") as folder:
        target = Path(folder) / path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", str(target), recursive=True)
            else:
                fs.get(path, str(target))
        except (OSError, ValueError) as error:
            raise InputError(f"Batch {uri} cannot be copied from the landing location ({error}); check it is readable.") from None
        yield target


def fingerprint(path: str | os.PathLike[str]) -> str:
    """The content fingerprint of a local batch (see ``shiftcost.data.content_fingerprint``)."""
    from shiftcost.data.batches import content_fingerprint

    try:
        return content_fingerprint(path)
    except OSError as error:
        raise InputError(f"Batch {path} cannot be read ({error.strerror or error}); check its permissions.") from None


def placeholder_fingerprint(uri: str, signature: str | None = None) -> str:
    """A stand-in fingerprint for an entry whose bytes are not read, stable per URI (and signature).

    It lets an unreadable or refused entry be registered (and marked failed with its
    reason) once, instead of failing again on every poll; with the entry's signature, an
    entry replaced at the same place is registered afresh.
    """
    key = uri if signature is None else f"{uri}\n{signature}"
    return "unreadable:" + hashlib.sha256(key.encode()).hexdigest()[:52]


# ----------------------------------------------------------------------------- archive


def join(location: str, name: str) -> str:
    """``name`` inside the folder or URL ``location``."""
    if is_local(location):
        return os.path.join(_local_path(location), name)
    return location.rstrip("/") + "/" + name


def archive_location(landing: str, archive: str) -> str | None:
    """Where processed entries go: ``archive`` itself, or inside ``landing`` when it is a bare name.

    An empty ``archive`` means entries stay where they landed (None).
    """
    archive = archive.strip()
    if not archive:
        return None
    if "://" in archive or os.path.isabs(os.path.expanduser(archive)):
        return os.path.expanduser(archive) if "://" not in archive else archive
    return join(landing, archive)


def move(uri: str, target: str) -> None:
    """Move the entry at ``uri`` to ``target`` as it is: a link moves as a link, a fifo is not opened.

    ``FileNotFoundError`` when the entry is gone; a ``ConfigError`` when the target is on
    another kind of filesystem.
    """
    if is_local(uri) and is_local(target):
        source, destination = _local_path(uri), _local_path(target)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.lstat(source)  # FileNotFoundError when the entry is gone
        try:
            os.rename(source, destination)  # never follows a link, never opens a file
        except OSError as error:
            if error.errno != 18:  # EXDEV: another device; copy what is a plain file or folder
                raise
            shutil.move(source, destination)
        return
    source_fs, source_path = _filesystem(uri)
    target_fs, target_path = _filesystem(target)
    if type(source_fs) is not type(target_fs):
        raise ConfigError(f"The landing archive {target} is not on the same kind of filesystem as {uri}; put it next to the landing location.")
    source_fs.info(source_path)  # FileNotFoundError when the entry is gone
    source_fs.mv(source_path, target_path, recursive=True)


def remove(uri: str) -> None:
    """Delete an archived entry (a folder with everything in it; a link, not what it points to)."""
    if is_local(uri):
        path = _local_path(uri)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return
    fs, path = _filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        return
