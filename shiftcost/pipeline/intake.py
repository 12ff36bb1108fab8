"""Intake: find the batches in the landing location and register each once.

Registration fingerprints the batch's bytes and inserts it under the unique
``(model_name, fingerprint)`` key, so the same data dropped twice, under any name, is one
batch. A batch that cannot even be read is registered too (under a stand-in fingerprint
for unreadable bytes) and marked failed with the reason in the same transaction: it is
reported once and the watcher goes on with the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from shiftcost import landing
from shiftcost.errors import InputError

if TYPE_CHECKING:
    from shiftcost.config import Settings
    from shiftcost.store import Database

__all__ = ["Registration", "discover_batches", "register_batch"]


@dataclass(frozen=True)
class Registration:
    """One batch after registration: ``created`` is False when it was already known."""

    batch_id: int
    source_uri: str
    fingerprint: str
    created: bool
    status: str
    samples: int
    has_labels: bool
    failure_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discover_batches(settings: Settings) -> list[landing.LandedBatch]:
    """The batches now in the landing location named by the settings (labels files that
    landed beside their batch, ``NAME.labels.npz``, are not batches)."""
    from shiftcost.pipeline.labels import is_labels_file

    return [landed for landed in landing.discover(settings.landing) if not is_labels_file(landed.name)]


def _peek(uri: str) -> tuple[str, int, bool, str | None]:
    """Fingerprint, image count and labels of a batch, or the reason it cannot be read."""
    from shiftcost.data.batches import load_batch

    try:
        with landing.local_copy(uri) as path:
            fingerprint = landing.fingerprint(path)
            try:
                batch = load_batch(path)
            except InputError as error:
                return fingerprint, 0, False, str(error)
            return fingerprint, len(batch), batch.has_labels, None
    except InputError as error:
        return landing.placeholder_fingerprint(uri), 0, False, str(error)


def register_batch(db: Database, settings: Settings, uri: str, *, model_name: str | None = None) -> Registration:
    """Register the batch at ``uri`` for the newest version of ``model_name`` (default: the setting).

    Idempotent: a batch whose bytes were registered before (under any name) comes back with
    ``created=False`` and its current status, and is not touched.
    """
    from shiftcost.store import repository

    name = model_name or settings.model_name
    fingerprint, samples, has_labels, problem = _peek(uri)
    with db.session() as session:
        model = repository.get_model(session, name)
        batch, created = repository.register_batch(session, model.id, uri, fingerprint, samples, has_labels)
        if created and problem is not None:
            batch = repository.set_batch_status(session, batch.id, "failed", problem)
        return Registration(
            batch_id=batch.id,
            source_uri=batch.source_uri,
            fingerprint=batch.fingerprint,
            created=created,
            status=batch.status,
            samples=batch.samples,
            has_labels=batch.has_labels,
            failure_reason=batch.failure_reason,
        )
