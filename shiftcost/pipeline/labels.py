"""Labels that come after their batch.

An unlabelled batch is assessed label-free; when the decision would be to retrain it
waits as ``awaiting_labels`` with its forecast. Its labels arrive either by
``shiftcost labels attach BATCH FILE`` or by the landing convention: ``NAME.labels.npz``
beside the batch ``NAME.npz`` (or beside the folder ``NAME``), picked up by the next poll.
A labels file is an ``.npz`` with ``y`` (one integer class id per image, in the batch's
order) and optionally ``fingerprint`` (the batch's content fingerprint, checked when
present). Attaching gives the batch back for assessment: the next poll decides afresh,
with the labelled features, and retrains if it fits.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shiftcost.errors import InputError

if TYPE_CHECKING:
    import torch

    from shiftcost.config import Settings
    from shiftcost.data import Batch
    from shiftcost.store import Database

LABELS_SUFFIX = ".labels.npz"

__all__ = ["LABELS_SUFFIX", "Attached", "attach_labels", "attach_landed_labels", "is_labels_file", "labels_beside", "read_labels", "with_labels"]


@dataclass(frozen=True)
class Attached:
    batch_id: int
    source_uri: str
    labels_uri: str
    samples: int
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_labels_file(name: str) -> bool:
    return name.endswith(LABELS_SUFFIX)


def labels_beside(source_uri: str) -> str:
    """Where the landing convention puts the labels of the batch at ``source_uri``."""
    stem = source_uri.rstrip("/")
    for suffix in (".npz", ".pt", ".pth"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + LABELS_SUFFIX


def read_labels(path: str | os.PathLike[str], *, samples: int, fingerprint: str | None, source: str) -> torch.Tensor:
    """The labels in ``path`` for a batch of ``samples`` images; one sentence when they do not fit it."""
    import numpy as np
    import torch

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "y" not in arrays:
                raise InputError(f"Labels file {path} has no array named y; save the labels with numpy.savez(FILE, y=labels).")
            y = np.asarray(arrays["y"])
            stored = str(arrays["fingerprint"]) if "fingerprint" in arrays else None
    except (OSError, ValueError) as error:
        raise InputError(f"Labels file {path} cannot be read as .npz ({error}); save it with numpy.savez(FILE, y=labels).") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"Labels file {path} holds y of shape {y.shape} and type {y.dtype}; give one integer class id per image.")
    if len(y) != samples:
        raise InputError(f"Labels file {path} has {len(y)} labels but batch {source} has {samples} images; give one label per image, in order.")
    if stored is not None and fingerprint is not None and stored != fingerprint:
        raise InputError(
            f"Labels file {path} belongs to the batch with fingerprint {stored[:12]}..., not to batch {source} ({fingerprint[:12]}...); "
            "attach it to its own batch."
        )
    if len(y) and y.min() < 0:
        raise InputError(f"Labels file {path} has negative labels; labels are class ids 0..K-1.")
    return torch.from_numpy(y.astype(np.int64))


def with_labels(batch: Batch, labels_uri: str | None, fingerprint: str | None) -> Batch:
    """``batch`` with the labels attached to it later (unchanged when there are none)."""
    import dataclasses

    if not labels_uri:
        return batch
    y = read_labels(labels_uri, samples=len(batch), fingerprint=fingerprint, source=str(batch.source))
    return dataclasses.replace(batch, y=y)


def attach_labels(db: Database, batch_ref: str, labels_file: str | os.PathLike[str]) -> Attached:
    """Attach ``labels_file`` to the batch ``batch_ref`` (its id or source URI) and give it
    back for assessment. Checked first, nothing written on a refusal."""
    from shiftcost.statuses import BatchStatus
    from shiftcost.store import batches

    path = Path(labels_file).resolve()
    if not path.is_file():
        raise InputError(f"Labels file {path} does not exist; check the path.")
    with db.session() as session:
        batch = batches.find_by_reference(session, batch_ref)
        if batch is None:
            raise InputError(f"No batch {batch_ref} is registered; give its id or source path as `shiftcost audit decisions` shows it.")
        if batches.retrain_runs_of(session, batch.id) or batch.status == BatchStatus.RETRAINING:
            raise InputError(f"Batch {batch.id} ({batch.source_uri}) was retrained on already (status {batch.status}); its labels cannot change now.")
        if batch.has_labels and not batch.labels_uri:
            raise InputError(f"Batch {batch.id} ({batch.source_uri}) came with labels; they cannot be replaced.")
        busy = f"Batch {batch.id} is being assessed right now; attach its labels again in a moment."
        if batch.status == BatchStatus.ASSESSING:
            raise InputError(busy)
        read_labels(path, samples=batch.samples, fingerprint=batch.fingerprint, source=f"{batch.id} ({batch.source_uri})")
        if not batches.reopen_with_labels(session, batch, str(path)):
            raise InputError(busy)
        return Attached(batch.id, batch.source_uri, str(path), batch.samples, BatchStatus.REGISTERED)


def attach_landed_labels(db: Database, settings: Settings) -> list[Attached]:
    """Attach the ``NAME.labels.npz`` files that have landed beside batches awaiting labels.

    A file that does not fit its batch is skipped here (the same check ``labels attach``
    reports), so one bad file does not stop the poll.
    """
    from shiftcost import landing
    from shiftcost.store import batches

    with db.session(readonly=True) as session:
        waiting = batches.awaiting_labels(session, settings.model_name)
    attached = []
    for batch_id, source_uri in waiting:
        beside = labels_beside(source_uri)
        if not landing.is_local(beside) or not Path(beside).is_file():
            continue
        try:
            attached.append(attach_labels(db, str(batch_id), beside))
        except InputError:
            continue
    return attached


def label_free_key(architecture: str) -> str:
    """The calibration key of an architecture's label-free cost model (fitted on features
    that need no labels: it forecasts batches whose labels have not come yet)."""
    return f"{architecture} (label-free)"
