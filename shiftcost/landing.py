"""The landing location: where new batches arrive, read through fsspec.

A landing location is a local folder (the default) or any fsspec URL (``s3://bucket/in``,
``gcs://...``, ``memory://landing`` ...). Each entry directly inside it is one batch:
a ``.npz`` / ``.pt`` / ``.pth`` file, or a sub-folder holding an ImageFolder tree. Entries
whose name starts with ``.`` or ``_`` are ignored, so a producer can write a batch under a
hidden name and rename it when it is complete (a half-written batch is never picked up).
Every other entry is reported, whatever its suffix: a stray file then fails with a reason
instead of being silently ignored.

Local entries are used in place; remote ones are copied to a temporary folder first,
because the batch readers (numpy, torch, torchvision's ImageFolder) need local files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiftcost.errors import ConfigError, InputError

__all__ = ["LandedBatch", "discover", "fingerprint", "is_local", "local_copy"]

_LOCAL_PROTOCOLS = frozenset({"file", "local"})


@dataclass(frozen=True)
class LandedBatch:
    """One entry of the landing location: its URI (a local path or a full URL) and kind."""

    uri: str
    name: str
    is_folder: bool
    size: int | None = None


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


def discover(location: str) -> list[LandedBatch]:
    """Every batch currently in the landing ``location``, sorted by name.

    A missing local folder is created (an empty landing area is normal); a missing remote
    location is a ``ConfigError``.
    """
    fs, root = _filesystem(location)
    local = is_local(location)
    if local:
        Path(root).mkdir(parents=True, exist_ok=True)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise ConfigError(f"The landing location {location} does not exist; create it or fix SHIFTCOST_LANDING.") from None
    except OSError as error:
        raise ConfigError(f"The landing location {location} cannot be listed ({error}); check its permissions.") from None
    batches = []
    for entry in entries:
        path = str(entry["name"]).rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if not name or name.startswith((".", "_")) or path == root.rstrip("/"):
            continue
        uri = os.path.abspath(path) if local else fs.unstrip_protocol(path)
        size = entry.get("size")
        batches.append(LandedBatch(uri=uri, name=name, is_folder=entry.get("type") == "directory", size=None if size is None else int(size)))
    return sorted(batches, key=lambda batch: batch.name)


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


def placeholder_fingerprint(uri: str) -> str:
    """A stand-in fingerprint for a batch whose bytes cannot be read, stable per URI.

    It lets an unreadable entry be registered (and marked failed with its reason) once,
    instead of failing again on every poll.
    """
    return "unreadable:" + hashlib.sha256(uri.encode()).hexdigest()[:52]
