"""The landing area: polls that skip what they know unread, duplicates, refusals, archive.

Every test runs on SQLite and PostgreSQL (``database_url``). A poll here is what the watch
flow's intake does, without Prefect around it: list what is new, register each entry.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from sqlalchemy import select, text

from shiftcost.pipeline import intake
from shiftcost.store import repository
from shiftcost.store.models import Batch, LandingEntry, utcnow

MODEL = "digits"


class CountingMemoryFileSystem(MemoryFileSystem):
    """The memory filesystem, counting every file it opens (reads included)."""

    protocol = "countingmem"
    opened: list[str] = []

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("countingmem://"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        CountingMemoryFileSystem.opened.append(path)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countingmem", CountingMemoryFileSystem, clobber=True)


def batch_bytes(seed: int, samples: int = 12) -> bytes:
    """A small valid .npz batch (8x8 grey images with labels)."""
    import io

    generator = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(buffer, x=generator.random((samples, 1, 8, 8), dtype=np.float32), y=generator.integers(0, 10, samples))
    return buffer.getvalue()


@dataclass
class Intake:
    db: Any
    settings: Any
    landing: Path
    root: Path

    def poll(self, settings: Any = None) -> list[intake.Registration]:
        """One poll's intake, as the watch flow runs it: what is new, each registered."""
        settings = settings or self.settings
        return [intake.register_landed(self.db, settings, landed) for landed in intake.discover_batches(self.db, settings)]

    def drop(self, name: str, data: bytes) -> Path:
        hidden = self.landing / f".{name}.partial"
        hidden.write_bytes(data)
        hidden.rename(self.landing / name)
        return self.landing / name

    def batches(self) -> list[Batch]:
        with self.db.session(readonly=True) as session:
            return list(session.scalars(select(Batch).order_by(Batch.id)))

    def entries(self) -> list[LandingEntry]:
        with self.db.session(readonly=True) as session:
            return list(session.scalars(select(LandingEntry).order_by(LandingEntry.id)))


@pytest.fixture
def env(db: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Intake:
    from shiftcost.config import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHIFTCOST_CONFIG", raising=False)
    landing = tmp_path / "landing"
    landing.mkdir()
    settings = load_settings(database_url=database_url, landing=str(landing), model_name=MODEL, landing_retention_days=None)
    with db.session() as session:
        repository.register_model(session, MODEL, "digits_cnn")
    return Intake(db, settings, landing, tmp_path)


@pytest.fixture
def counting_landing() -> Iterator[str]:
    folder = f"/landing-{uuid.uuid4().hex}"
    yield f"countingmem://{folder}"
    CountingMemoryFileSystem().rm(folder, recursive=True)


# ----------------------------------------------------------------------------- skipping what is known


def test_a_poll_with_nothing_new_opens_no_entry(env: Intake, counting_landing: str) -> None:
    fs = CountingMemoryFileSystem()
    for number in range(3):
        fs.pipe(f"{counting_landing.removeprefix('countingmem://')}/batch-{number}.npz", batch_bytes(number))
    settings = env.settings.model_copy(update={"landing": counting_landing, "landing_archive": ""})
    CountingMemoryFileSystem.opened.clear()

    first = env.poll(settings)
    assert [r.entry_state for r in first] == ["registered"] * 3
    assert len(CountingMemoryFileSystem.opened) >= 3  # the first poll did read them: the counter works

    CountingMemoryFileSystem.opened.clear()
    assert env.poll(settings) == [] and env.poll(settings) == []
    assert CountingMemoryFileSystem.opened == []


def test_a_known_local_entry_is_skipped_by_its_signature_and_a_changed_one_registered_afresh(env: Intake) -> None:
    path = env.drop("monday.npz", batch_bytes(1))
    (registered,) = env.poll()
    status = path.stat()
    # Other bytes of the same size and modification time: the poll does not look inside.
    path.write_bytes(b"\0" * status.st_size)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert env.poll() == []

    path.write_bytes(batch_bytes(2))  # a new version of the file: new size and time
    (changed,) = env.poll()
    assert changed.created and changed.batch_id != registered.batch_id and changed.status == "registered"


def test_a_poll_that_registers_nothing_uses_up_no_id(env: Intake, backend: str) -> None:
    env.drop("a.npz", batch_bytes(1))
    env.drop("corrupt.npz", b"PK\x03\x04 not a whole archive")
    first = env.poll()
    sequences_before = _sequences(env) if backend == "postgres" else None

    for _ in range(3):
        assert env.poll() == []
    # Registering a known fingerprint again (the command line does) registers nothing either.
    again = intake.register_batch(env.db, env.settings, str(env.landing / "a.npz"))
    assert not again.created
    if backend == "postgres":
        assert _sequences(env) == sequences_before

    env.drop("b.npz", batch_bytes(2))
    (new,) = env.poll()
    assert new.batch_id == max(r.batch_id for r in first) + 1
    assert [entry.id for entry in env.entries()] == [1, 2, 3]


def _sequences(env: Intake) -> tuple[Any, ...]:
    values = []
    with env.db.session(readonly=True) as session:
        for table in ("batches", "landing_entries"):
            sequence = session.scalar(text(f"SELECT pg_get_serial_sequence('{table}', 'id')"))
            values.append(tuple(session.execute(text(f"SELECT last_value, is_called FROM {sequence}")).one()))
    return tuple(values)


# ----------------------------------------------------------------------------- duplicates


def test_a_duplicate_is_recorded_with_the_batch_it_repeats_and_when(env: Intake) -> None:
    env.drop("monday.npz", batch_bytes(1))
    (original,) = env.poll()
    before = utcnow()
    env.drop("monday-again.npz", batch_bytes(1))

    (duplicate,) = env.poll()

    assert not duplicate.created and duplicate.entry_state == "duplicate" and duplicate.batch_id == original.batch_id
    assert len(env.batches()) == 1
    entry = next(e for e in env.entries() if e.location.endswith("monday-again.npz"))
    assert entry.state == "duplicate" and entry.batch_id == original.batch_id
    assert entry.seen_at >= before - timedelta(seconds=1)
    assert f"batch {original.batch_id}" in entry.reason and "monday.npz" in entry.reason
    assert env.poll() == []


# ----------------------------------------------------------------------------- what is not a batch


def test_links_and_special_files_are_registered_failed_unfollowed_and_unopened(env: Intake) -> None:
    outside = env.root / "outside"
    outside.mkdir()
    (outside / "secret.npz").write_bytes(batch_bytes(7))
    (env.landing / "outside-folder").symlink_to(outside)
    (env.landing / "etc").symlink_to("/etc")
    (env.landing / "zero.npz").symlink_to("/dev/zero")
    os.mkfifo(env.landing / "p.npz")
    linked_inside = env.landing / "folder-with-a-link"
    (linked_inside / "cats").mkdir(parents=True)
    (linked_inside / "cats" / "hosts.png").symlink_to("/etc/hosts")

    with ThreadPoolExecutor(1) as pool:
        polled = pool.submit(env.poll)
        try:
            registrations = polled.result(timeout=120)
        finally:
            if not polled.done():  # it opened the fifo and waits for a writer: let it go, then fail
                os.close(os.open(env.landing / "p.npz", os.O_WRONLY | os.O_NONBLOCK))

    assert {r.status for r in registrations} == {"failed"} and len(registrations) == 5
    reasons = {Path(r.source_uri).name: r.failure_reason for r in registrations}
    assert "is a symbolic link" in reasons["outside-folder"] and "never follows links" in reasons["outside-folder"]
    assert "is a symbolic link" in reasons["etc"] and "is a symbolic link" in reasons["zero.npz"]
    assert "is a fifo" in reasons["p.npz"] and "not opened" in reasons["p.npz"]
    assert "holds a symbolic link (cats/hosts.png)" in reasons["folder-with-a-link"]
    stored = " ".join(f"{b.source_uri} {b.failure_reason}" for b in env.batches())
    assert "passwd" not in stored and "secret.npz" not in stored and "localhost" not in stored
    assert {e.state for e in env.entries()} == {"failed"} and {e.kind for e in env.entries()} == {"link", "special", "folder"}
    assert env.poll() == []  # refused once, not examined again


def test_empty_entries_are_refused_each_as_what_it_is_under_its_own_fingerprint(env: Intake) -> None:
    (env.landing / "empty.npz").write_bytes(b"")
    (env.landing / "empty-folder").mkdir()
    (env.landing / "folder-of-empties" / "cats").mkdir(parents=True)
    (env.landing / "folder-of-empties" / "cats" / "a.png").write_bytes(b"")

    registrations = env.poll()

    reasons = {Path(r.source_uri).name: r.failure_reason for r in registrations}
    assert reasons["empty.npz"].endswith("is an empty file; land the whole batch (write it under a hidden name, then rename it).")
    assert "is an empty folder" in reasons["empty-folder"] and "is an empty folder" in reasons["folder-of-empties"]
    assert len({r.fingerprint for r in registrations}) == 3 and all(r.status == "failed" for r in registrations)


def test_a_batch_that_cannot_be_loaded_for_any_reason_is_registered_failed_once(env: Intake, monkeypatch: pytest.MonkeyPatch) -> None:
    from shiftcost.data import batches

    real_load = batches.load_batch
    loads: list[str] = []

    def load_or_run_out_of_memory(path: Any, **kwargs: Any) -> Any:
        loads.append(Path(path).name)
        if Path(path).name == "huge.npz":
            raise MemoryError()  # what a batch declaring a huge array does to the loader
        return real_load(path, **kwargs)

    monkeypatch.setattr(batches, "load_batch", load_or_run_out_of_memory)
    env.drop("huge.npz", batch_bytes(3))
    env.drop("corrupt.npz", b"PK\x03\x04 not a whole archive")

    registrations = {Path(r.source_uri).name: r for r in env.poll()}

    assert registrations["huge.npz"].status == "failed" and "MemoryError" in registrations["huge.npz"].failure_reason
    assert registrations["corrupt.npz"].status == "failed" and "corrupt.npz" in registrations["corrupt.npz"].failure_reason
    assert sorted(loads) == ["corrupt.npz", "huge.npz"]
    assert env.poll() == [] and sorted(loads) == ["corrupt.npz", "huge.npz"]


# ----------------------------------------------------------------------------- archive and retention


def _finish(env: Intake, batch_id: int, status: str = "done") -> None:
    with env.db.session() as session:
        repository.set_batch_status(session, batch_id, status, "refused" if status == "failed" else None)


def test_final_batches_duplicates_and_refusals_move_to_the_archive_and_expire(env: Intake) -> None:
    done = env.drop("done.npz", batch_bytes(1))
    waiting = env.drop("waiting.npz", batch_bytes(2))
    env.drop("later-copy.npz", batch_bytes(1))
    (env.landing / "etc").symlink_to("/etc")
    registrations = {Path(r.source_uri).name: r for r in env.poll()}
    _finish(env, registrations["done.npz"].batch_id)
    archive = env.landing / "_archive"

    report = intake.archive_processed(env.db, env.settings)

    assert sorted(os.listdir(env.landing)) == ["_archive", "waiting.npz"]  # a batch still in progress stays
    entries = {Path(e.location).name: e for e in env.entries()}
    assert sorted(report.archived) == sorted(str(archive / f"{entries[n].id}-{n}") for n in ("done.npz", "later-copy.npz", "etc"))
    moved_link = archive / f"{entries['etc'].id}-etc"
    assert moved_link.is_symlink() and os.readlink(moved_link) == "/etc"  # moved as a link, not followed
    assert (archive / f"{entries['done.npz'].id}-done.npz").read_bytes() == batch_bytes(1)
    assert entries["done.npz"].archived_at is not None and entries["waiting.npz"].archived_at is None
    assert env.poll() == [] and not done.exists() and waiting.exists()

    later = utcnow() + timedelta(days=8)
    kept = intake.archive_processed(env.db, env.settings.model_copy(update={"landing_retention_days": 10.0}), now=later)
    assert kept.purged == [] and len(os.listdir(archive)) == 3
    expired = intake.archive_processed(env.db, env.settings.model_copy(update={"landing_retention_days": 7.0}), now=later)
    assert sorted(expired.purged) == sorted(report.archived) and os.listdir(archive) == []
    assert os.path.isdir("/etc")
    assert all(e.purged_at is not None for e in env.entries() if e.archived_at is not None)
    assert intake.archive_processed(env.db, env.settings.model_copy(update={"landing_retention_days": 7.0}), now=later).purged == []


def test_an_fsspec_landing_area_archives_to_its_own_filesystem_and_nothing_moves_when_archiving_is_off(env: Intake) -> None:
    folder = f"/landing-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{folder}/done.npz", batch_bytes(1))
    settings = env.settings.model_copy(update={"landing": f"memory://{folder}", "landing_archive": ""})
    (registration,) = env.poll(settings)
    _finish(env, registration.batch_id, "failed")

    assert intake.archive_processed(env.db, settings).archived == []
    assert fs.exists(f"{folder}/done.npz")

    archived = intake.archive_processed(env.db, settings.model_copy(update={"landing_archive": "_archive"}))
    (entry,) = env.entries()
    assert archived.archived == [f"memory://{folder}/_archive/{entry.id}-done.npz"] == [entry.archive_uri]
    assert fs.cat(f"{folder}/_archive/{entry.id}-done.npz") == batch_bytes(1) and not fs.exists(f"{folder}/done.npz")
    assert env.poll(settings) == []
    fs.rm(folder, recursive=True)


def test_racing_polls_register_an_entry_once(env: Intake) -> None:
    env.drop("a.npz", batch_bytes(1))
    barrier = threading.Barrier(4)

    def poll() -> list[intake.Registration]:
        barrier.wait()
        return env.poll()

    with ThreadPoolExecutor(4) as pool:
        results = [r for future in [pool.submit(poll) for _ in range(4)] for r in future.result(timeout=120)]

    assert len(env.batches()) == 1 and len(env.entries()) == 1
    assert sum(r.created for r in results) == 1 and {r.batch_id for r in results} == {env.batches()[0].id}
    assert env.entries()[0].state == "registered"
