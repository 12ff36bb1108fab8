"""Where model versions, reference stats, replay samples and drift reports are kept.

The artifacts location is a local folder (the default) or any fsspec URL (``s3://bucket/
artifacts``, ``memory://artifacts`` ...), like the landing location. The writers of these
files (safetensors, numpy, Evidently) need local paths, so :func:`writing` hands out a
local path and uploads the file when the block ends without error (a failed write
uploads nothing), and :func:`reading` gives a local copy to read from. Local artifacts are
written and read in place.

What a model version stores is bounded: its weights, its reference statistics (fixed
size: per-class sums, histograms and subsamples capped by ``max_samples``) and a replay
sample of at most ``reference_replay_samples`` labelled images (:func:`bounded_sample`),
never the concatenation of every batch it was retrained on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftcost.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from shiftcost.config import Settings

__all__ = ["Artifacts", "bounded_sample", "reading", "remove", "writing"]


def _filesystem(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ConfigError(
            f"The artifacts location {url!r} cannot be opened ({error}); use a local folder or an fsspec URL whose filesystem is installed."
        ) from None


def _local_path(url: str) -> str | None:
    """The local path ``url`` names, or None when it is remote."""
    fs, path = _filesystem(url)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return os.path.abspath(os.path.expanduser(path)) if protocols & {"file", "local"} else None


@dataclass(frozen=True)
class Artifacts:
    """Where model weights, reference stats and replay samples, and drift reports go: URLs."""

    root: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Artifacts:
        location = settings.artifacts_dir
        local = _local_path(location)
        return cls(local if local is not None else location.rstrip("/"))

    def _url(self, *parts: str) -> str:
        if _local_path(self.root) is not None:
            return os.path.join(self.root, *parts)
        return "/".join([self.root, *parts])

    def model_weights(self, model_name: str, tag: str) -> str:
        return self._url("models", _safe(model_name), f"{tag}.safetensors")

    def reference_stats(self, model_name: str, tag: str) -> str:
        return self._url("reference", _safe(model_name), f"{tag}.safetensors")

    def reference_data(self, model_name: str, tag: str) -> str:
        return self._url("reference", _safe(model_name), f"{tag}-data.npz")

    def drift_report(self, batch_id: int, fingerprint: str) -> str:
        return self._url("drift", f"batch-{batch_id}-{fingerprint.replace(':', '-')[:16]}.html")


def _safe(name: str) -> str:
    """A model name as a single path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


@contextmanager
def writing(url: str) -> Iterator[Path]:
    """A local path to write the artifact ``url`` to; a remote artifact is uploaded afterwards.

    The upload happens only when the block ends without error, so a failed write leaves
    nothing at ``url``.
    """
    local = _local_path(url)
    if local is not None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        yield Path(local)
        return
    fs, path = _filesystem(url)
    with tempfile.TemporaryDirectory(prefix="shiftcost-artifact-") as folder:
        staged = Path(folder) / path.rsplit("/", 1)[-1]
        yield staged
        try:
            fs.put_file(str(staged), path)
        except OSError as error:
            raise ConfigError(f"The artifact {url} cannot be written ({error}); check the artifacts location and its permissions.") from None


@contextmanager
def reading(url: str) -> Iterator[Path]:
    """A local path holding the artifact ``url``: the path itself, or a temporary copy."""
    local = _local_path(url)
    if local is not None:
        yield Path(local)
        return
    fs, path = _filesystem(url)
    with tempfile.TemporaryDirectory(prefix="shiftcost-artifact-") as folder:
        copy = Path(folder) / path.rsplit("/", 1)[-1]
        try:
            fs.get_file(path, str(copy))
        except FileNotFoundError:
            raise InputError(f"The artifact {url} does not exist; check the artifacts location.") from None
        except OSError as error:
            raise InputError(f"The artifact {url} cannot be read ({error}); check the artifacts location.") from None
        yield copy


def remove(url: str) -> None:
    """Delete the artifact ``url`` if it exists (cleaning up after a failed version)."""
    local = _local_path(url)
    if local is not None:
        Path(local).unlink(missing_ok=True)
        return
    fs, path = _filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def bounded_sample(x: torch.Tensor, y: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``limit`` of the labelled images, drawn uniformly without replacement (seeded)."""
    import torch

    if len(x) <= limit:
        return x, y
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return x[chosen], y[chosen]
