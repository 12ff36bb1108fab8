"""Faults around the database: secrets in URLs, foreign drivers, a held lock, downgrades with data."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.errors import ConfigError
from shiftcost.redaction import redact_url, scrub
from shiftcost.store import migrate, open_database
from shiftcost.store.db import redact
from shiftcost.store.errors import DatabaseBusyError, DatabaseUnavailableError
from tests.store import seed


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://postgres:hunter2xyz@127.0.0.1:5432/test",
        "postgresql+psycopg2://postgres@127.0.0.1:5432/test?password=hunter2xyz&sslmode=require",
        "postgresql+psycopg2://postgres@127.0.0.1/test?sslmode=verify-full&sslpassword=hunter2xyz",
        "s3://bucket/landing/x.npz?X-Amz-Credential=AKIA&X-Amz-Signature=hunter2xyz",
        "https://user:hunter2xyz@example.org/data?token=hunter2xyz#frag",
    ],
)
def test_secrets_are_redacted_wherever_they_sit_in_a_url(url: str) -> None:
    shown = redact_url(url)
    assert "hunter2xyz" not in shown and "***" in shown
    assert scrub(f"failed for {url}: password hunter2xyz refused", url).count("hunter2xyz") == 0
    if url.startswith("postgresql"):
        assert "hunter2xyz" not in redact(url) and redact(url).startswith("postgresql+psycopg2://postgres")


def test_an_unreachable_database_never_prints_the_query_string_password() -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/test?password=hunter2xyz&connect_timeout=2"
    with pytest.raises(DatabaseUnavailableError) as raised:
        open_database(url)
    assert "hunter2xyz" not in str(raised.value) and "password=***" in str(raised.value)


def test_an_asyncio_driver_is_refused_with_one_sentence() -> None:
    with pytest.raises(ConfigError, match="asyncio driver asyncpg.*postgresql\\+psycopg2://") as raised:
        open_database("postgresql+asyncpg://postgres:hunter2xyz@127.0.0.1:5432/test")
    assert "hunter2xyz" not in str(raised.value)


@pytest.mark.parametrize("backend", ["sqlite"])  # the write lock is SQLite's own
def test_a_write_lock_held_by_another_process_past_the_timeout_is_one_sentence(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shiftcost.store.db as store_db

    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    path = database_url.removeprefix("sqlite:///")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        db = open_database(database_url)
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError, match="stayed locked by another process for more than 0.3 s"):
                seed.committed(db).create_budget("b", period="daily", kwh_cap=1.0)
            assert time.monotonic() - started < 10
        finally:
            db.dispose()
    finally:
        holder.kill()
        holder.wait()


def test_db_downgrade_with_data_in_the_tables(database_url: str, db) -> None:
    seed.committed(db).create_budget("b", period="daily", kwh_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("b", 0.1, 0.0, decision_id)
    db.dispose()
    result = CliRunner().invoke(app, ["db", "downgrade", "0001", "--yes", "--database-url", database_url])
    assert result.exit_code == 0, result.exception
    assert migrate.current_revisions(database_url) == ("0001",)
    migrate.upgrade(database_url)
    reopened = open_database(database_url)
    try:
        assert seed.committed(reopened).remaining("b").open_reservations == 1  # the data survived the round trip
    finally:
        reopened.dispose()
