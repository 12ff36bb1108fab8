"""Connections: unreachable databases, hidden passwords, a server that drops a connection."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, func, select

from shiftcost.store import open_database, redact
from shiftcost.store import repository as repo
from shiftcost.store.errors import DatabaseUnavailableError
from shiftcost.store.models import Model

from . import seed


def test_unopenable_sqlite_file_names_the_url(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}"
    with pytest.raises(DatabaseUnavailableError, match="unable to open database file") as raised:
        open_database(url)
    assert url in str(raised.value)
    assert "folder exists" in str(raised.value) and "server" not in str(raised.value)  # a file, not a server


def test_unreachable_server_message_hides_the_password() -> None:
    url = "postgresql+psycopg2://auditor:pa55word@127.0.0.1:1/ledger"
    with pytest.raises(DatabaseUnavailableError) as raised:
        open_database(url, connect_args={"connect_timeout": 5})
    message = str(raised.value)
    assert "pa55word" not in message
    assert "postgresql+psycopg2://auditor:***@127.0.0.1:1/ledger" in message
    assert "check that the server is running" in message
    assert "\n" not in message
    assert redact(url) == "postgresql+psycopg2://auditor:***@127.0.0.1:1/ledger"


@pytest.mark.postgres
def test_dropped_connection_fails_cleanly_then_recovers(
    postgres_database_url: str, postgres_admin_url: str
) -> None:
    postgres_db = open_database(postgres_database_url)
    admin = create_engine(postgres_admin_url)
    try:
        with pytest.raises(DatabaseUnavailableError, match="Cannot use the database"):
            with postgres_db.session() as session:
                seed.model(session, name="half-written")
                pid = session.execute(select(func.pg_backend_pid())).scalar_one()
                with admin.begin() as connection:
                    connection.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
                repo.register_model(session, "half-written", "cnn")  # the server is gone for this one
        # The pool notices the dead connection; the next session simply works, and the
        # interrupted transaction left nothing behind.
        with postgres_db.session(readonly=True) as session:
            assert session.scalar(select(func.count()).select_from(Model)) == 0
    finally:
        admin.dispose()
        postgres_db.dispose()


# --- one engine per URL per process -------------------------------------------------------


def test_shared_database_is_opened_once_per_url(database_url: str) -> None:
    from shiftcost.store.db import shared_database

    first = shared_database(database_url)
    second = shared_database(database_url)
    assert second is first and second.engine is first.engine
    with second.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 0


def _child_report(url: str, queue) -> None:
    """Runs in a forked child: is the shared database the parent's, and does it work?"""
    from shiftcost.store import db as store_db

    parent = _PARENT["database"]  # the parent's object, as fork copied it
    mine = store_db.shared_database(url)
    with mine.session(readonly=True) as session:
        backend_pid = session.scalar(select(func.pg_backend_pid())) if mine.dialect == "postgresql" else None
        session.scalar(select(func.count()).select_from(Model))
    queue.put((mine is parent, mine.engine.pool is parent.engine.pool, backend_pid))
    queue.close()
    queue.join_thread()
    # The child inherits the test worker's exit handlers (pools and queues of earlier tests in
    # the same process); running them here would fail the exit code for reasons not tested.
    os._exit(0)


_PARENT: dict[str, object] = {}


def test_forked_child_opens_its_own_pool(database_url: str) -> None:
    import multiprocessing

    from shiftcost.store.db import shared_database

    parent = shared_database(database_url)
    with parent.session(readonly=True) as session:
        parent_backend = session.scalar(select(func.pg_backend_pid())) if parent.dialect == "postgresql" else None
    _PARENT["database"] = parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_report, args=(database_url, queue))
    child.start()
    same_object, same_pool, child_backend = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert not same_object and not same_pool
    if parent_backend is not None:
        assert child_backend != parent_backend
    # The child dropped the parent's pool without closing its connection: the parent keeps it.
    with parent.session(readonly=True) as session:
        again = session.scalar(select(func.pg_backend_pid())) if parent.dialect == "postgresql" else None
    assert again == parent_backend


def test_shared_database_refuses_an_unmigrated_schema_in_one_sentence(empty_database_url: str) -> None:
    from shiftcost.store.db import shared_database
    from shiftcost.store.errors import SchemaVersionError

    with pytest.raises(SchemaVersionError) as direct:
        open_database(empty_database_url)
    for _ in range(2):  # a refused database is not kept: the next call checks again
        with pytest.raises(SchemaVersionError) as shared:
            shared_database(empty_database_url)
        assert str(shared.value) == str(direct.value)
        assert "\n" not in str(shared.value) and "run `shiftcost db upgrade`" in str(shared.value)


def test_a_sqlite_url_naming_no_file_is_refused_in_one_sentence_and_no_file_is_left(tmp_path) -> None:
    from shiftcost.store.errors import SchemaVersionError

    missing = tmp_path / "mistyped.db"
    with pytest.raises(SchemaVersionError) as raised:
        open_database(f"sqlite:///{missing}")
    assert str(raised.value) == (
        f"There is no database at {missing}: run `shiftcost db upgrade` to create it, or check SHIFTCOST_DATABASE_URL."
    )
    assert not missing.exists()
    # Creating it is what upgrading is for.
    open_database(f"sqlite:///{missing}", upgrade=True).dispose()
    assert missing.exists()
    open_database(f"sqlite:///{missing}").dispose()
