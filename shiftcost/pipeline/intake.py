"""Intake: find what is new in the landing location, register each batch once, archive the rest.

A poll lists the landing location's metadata and keeps only the entries whose (location,
signature) the ``landing_entries`` table does not know: a known entry costs one row lookup
and no byte read, so a poll with nothing new stays cheap however long the history. A new
entry is examined before it is read (links, special files and empty entries are refused
without being followed or opened), then fingerprinted and registered under the unique
``(model_name, fingerprint)`` key, so the same data dropped twice, under any name, is one
batch; the second entry is recorded as a duplicate of the first batch. An entry that is
refused or cannot be loaded, for whatever reason, is registered as a failed batch with the
reason in the same transaction: it is reported once and never read again.

Once an entry's batch is final (done or failed), or the entry is a duplicate, it moves to
the archive (``landing_archive``) so the landing location holds what is new, and archived
entries are deleted after ``landing_retention_days``. Nothing here uses up a database id
unless it registers something: every insert is preceded by a lookup.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shiftcost import landing
from shiftcost.errors import ConfigError
from shiftcost.redaction import redact_text, redact_url
from shiftcost.statuses import BatchStatus, LandingEntryState

if TYPE_CHECKING:
    from shiftcost.config import Settings
    from shiftcost.store import Database

__all__ = ["ArchiveReport", "Registration", "archive_processed", "discover_batches", "register_batch", "register_landed"]

#: Locations looked up per query (SQLite allows 32,766 bound parameters; PostgreSQL more).
_LOOKUP_CHUNK = 900


@dataclass(frozen=True)
class Registration:
    """One batch after registration: ``created`` is False when it was already known.

    ``entry_state`` says what the landing entry was: ``registered`` (a new batch),
    ``failed`` (a new batch refused with ``failure_reason``) or ``duplicate`` (the bytes of
    the earlier batch ``batch_id``); None when the batch was registered outside the landing
    area (``shiftcost assess PATH``).
    """

    batch_id: int
    source_uri: str
    fingerprint: str
    created: bool
    status: str
    samples: int
    has_labels: bool
    failure_reason: str | None = None
    entry_state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discover_batches(db: Database, settings: Settings) -> list[landing.LandedBatch]:
    """The entries now in the landing location that are not known yet (new, or changed since).

    Reads metadata only; entries known by location and signature are left out unread.
    """
    from shiftcost.pipeline.labels import is_labels_file
    from shiftcost.store import landing_entries

    # Labels files that landed beside their batch (NAME.labels.npz) are not batches.
    found = [entry for entry in landing.discover(settings.landing) if not is_labels_file(entry.name)]
    known: set[tuple[str, str]] = set()
    with db.session(readonly=True) as session:
        for start in range(0, len(found), _LOOKUP_CHUNK):
            locations = [entry.uri for entry in found[start : start + _LOOKUP_CHUNK]]
            known |= landing_entries.known_signatures(session, settings.model_name, locations)
    return [entry for entry in found if (entry.uri, entry.signature) not in known]


def _load_problem(uri: str, error: BaseException) -> str:
    from shiftcost.errors import InputError

    if isinstance(error, InputError):
        return str(error)
    text = " ".join(str(error).split())[:200] or "no message"
    return f"Batch {uri} cannot be loaded ({type(error).__name__}: {text}); fix or remove it."


def _peek(landed: landing.LandedBatch) -> tuple[str, int, bool, str | None]:
    """Fingerprint, image count and labels of a batch, or the reason it is not one."""
    from shiftcost.data.batches import load_batch
    from shiftcost.errors import InputError

    try:
        problem = landing.refusal(landed)
    except OSError as error:
        problem = f"Batch {landed.uri} cannot be examined ({error.strerror or error}); check its permissions."
    if problem is not None:
        return landing.placeholder_fingerprint(landed.uri, landed.signature), 0, False, problem
    try:
        with landing.local_copy(landed.uri) as path:
            fingerprint = landing.fingerprint(path)
            try:
                batch = load_batch(path)
            except Exception as error:  # corrupt, oversized, out of memory: the batch's fault, reported once
                return fingerprint, 0, False, _load_problem(landed.uri, error)
            return fingerprint, len(batch), batch.has_labels, None
    except InputError as error:
        return landing.placeholder_fingerprint(landed.uri, landed.signature), 0, False, str(error)


def register_landed(
    db: Database, settings: Settings, landed: landing.LandedBatch, *, model_name: str | None = None, record_entry: bool = True
) -> Registration:
    """Register the landed entry for the newest version of ``model_name`` (default: the setting).

    Idempotent: a batch whose bytes were registered before (under any name) comes back with
    ``created=False`` and its current status, untouched; the entry is recorded as its
    duplicate. With ``record_entry`` the entry is remembered, so later polls skip it unread.
    """
    from shiftcost.store import landing_entries, repository

    name = model_name or settings.model_name
    if record_entry:
        with db.session(readonly=True) as session:
            entry = landing_entries.find(session, name, landed.uri, landed.signature)
            if entry is not None and entry.batch_id is not None:
                batch = repository.get_batch(session, entry.batch_id)
                return _registration(batch, created=False, entry_state=entry.state)
    fingerprint, samples, has_labels, problem = _peek(landed)
    problem = None if problem is None else redact_text(problem)
    with db.session() as session:
        model = repository.get_model(session, name)
        batch, created = repository.register_batch(session, model.id, landed.uri, fingerprint, samples, has_labels)
        if created and problem is not None:
            batch = repository.set_batch_status(session, batch.id, BatchStatus.FAILED, problem)
        state = None
        if record_entry:
            state = _entry_state(created, problem)
            reason = problem if created else f"same bytes as batch {batch.id} ({redact_url(batch.source_uri)})"
            landing_entries.record(session, name, landed, state, batch.id, reason)
        return _registration(batch, created=created, entry_state=state)


def _entry_state(created: bool, problem: str | None) -> LandingEntryState:
    if not created:
        return LandingEntryState.DUPLICATE
    return LandingEntryState.FAILED if problem is not None else LandingEntryState.REGISTERED


def _registration(batch: Any, *, created: bool, entry_state: str | None) -> Registration:
    return Registration(
        batch_id=batch.id,
        source_uri=batch.source_uri,
        fingerprint=batch.fingerprint,
        created=created,
        status=batch.status,
        samples=batch.samples,
        has_labels=batch.has_labels,
        failure_reason=batch.failure_reason,
        entry_state=entry_state,
    )


def register_batch(db: Database, settings: Settings, uri: str, *, model_name: str | None = None) -> Registration:
    """Register the batch at ``uri`` (any path or URL, not only in the landing area) once.

    The same checks as for landed entries apply (a link or special file is refused
    unopened); no landing entry is recorded, since nothing polls ``uri``.
    """
    from shiftcost.errors import InputError

    try:
        landed = landing.describe(uri)
    except InputError as error:
        # A missing batch is registered failed too, under a stand-in fingerprint, so it is reported once.
        return _register_missing(db, settings, uri, str(error), model_name)
    return register_landed(db, settings, landed, model_name=model_name, record_entry=False)


def _register_missing(db: Database, settings: Settings, uri: str, problem: str, model_name: str | None) -> Registration:
    from shiftcost.store import repository

    with db.session() as session:
        model = repository.get_model(session, model_name or settings.model_name)
        batch, created = repository.register_batch(session, model.id, uri, landing.placeholder_fingerprint(uri), 0, False)
        if created:
            batch = repository.set_batch_status(session, batch.id, BatchStatus.FAILED, problem)
        return _registration(batch, created=created, entry_state=None)


# ----------------------------------------------------------------------------- archive


@dataclass
class ArchiveReport:
    """What one archive pass did: entries moved, entries deleted after retention, problems."""

    archived: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def archive_processed(db: Database, settings: Settings, *, now: datetime | None = None) -> ArchiveReport:
    """Move entries whose batch is final, and duplicates, to the archive; delete expired ones.

    Final means the batch is ``done``, ``failed`` or ``stopped_by_budget``: nothing reads its bytes again. An
    entry is moved as it is (a link as a link, a fifo unopened) to
    ``<archive>/<entry id>-<name>``. With ``landing_retention_days`` set, archived entries
    older than that are deleted. Each step is one indexed query over entries not yet
    archived (or not yet deleted), so its cost does not grow with the history. A move that
    fails is reported and tried again on the next pass; an entry already gone is marked
    archived without a location.
    """
    from shiftcost.store import landing_entries
    from shiftcost.store.models import utcnow

    report = ArchiveReport()
    archive = landing.archive_location(settings.landing, settings.landing_archive)
    if archive is None:
        return report
    now = now or utcnow()
    with db.session(readonly=True) as session:
        entries = landing_entries.to_archive(session, settings.model_name)
    for entry_id, location in entries:
        target: str | None = landing.join(archive, f"{entry_id}-{location.rstrip('/').rsplit('/', 1)[-1]}")
        try:
            landing.move(location, target)
        except FileNotFoundError:
            target = None
        except (OSError, ConfigError) as error:
            report.problems.append(redact_text(f"Landing entry {location} could not be moved to {target} ({error}); it is tried again on the next poll."))
            continue
        with db.session() as session:
            landing_entries.mark_archived(session, entry_id, now, target)
        if target is not None:
            report.archived.append(target)
    if settings.landing_retention_days is not None:
        _purge_expired(db, settings.model_name, now - timedelta(days=settings.landing_retention_days), now, report)
    return report


def _purge_expired(db: Database, model_name: str, cutoff: datetime, now: datetime, report: ArchiveReport) -> None:
    """Delete the entries archived before ``cutoff``; a deletion that fails is tried again next pass."""
    from shiftcost.store import landing_entries

    with db.session(readonly=True) as session:
        rows = landing_entries.expired(session, model_name, cutoff)
    for entry_id, archive_uri in rows:
        try:
            if archive_uri is not None:
                landing.remove(archive_uri)
        except OSError as error:
            report.problems.append(redact_text(f"Archived entry {archive_uri} could not be deleted ({error}); it is tried again on the next poll."))
            continue
        with db.session() as session:
            landing_entries.mark_purged(session, entry_id, now)
        if archive_uri is not None:
            report.purged.append(archive_uri)
