"""Connections: unreachable databases, hidden passwords, a server that drops a connection."""

from __future__ import annotations

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


def test_unreachable_server_message_hides_the_password() -> None:
    url = "postgresql+psycopg2://auditor:pa55word@127.0.0.1:1/ledger"
    with pytest.raises(DatabaseUnavailableError) as raised:
        open_database(url, connect_args={"connect_timeout": 5})
    message = str(raised.value)
    assert "pa55word" not in message
    assert "postgresql+psycopg2://auditor:***@127.0.0.1:1/ledger" in message
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
