"""Engines and sessions: the one place where database connections are opened.

SQLite is configured as SQLAlchemy documents for the ``sqlite3`` driver so that its
transactions are real: the driver's own BEGIN handling is switched off
(``isolation_level = None``) and SQLAlchemy emits ``BEGIN IMMEDIATE`` itself, which takes
the database write lock at the start of the transaction. Read-only sessions use
``BEGIN DEFERRED`` so audits never wait for writers. WAL lets readers run beside the one
writer, ``busy_timeout`` makes a waiting writer wait instead of failing, and foreign keys
are enforced.

PostgreSQL connections are pre-pinged so a restarted server does not break a pool.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import PurePath
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from shiftcost.errors import ConfigError
from shiftcost.store.errors import DatabaseBusyError, DatabaseUnavailableError, SchemaVersionError

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "shiftcost_sqlite_begin"


def parse_url(url: str | URL) -> URL:
    """Parse a database URL, or raise ``ConfigError`` without echoing it (it may hold a password)."""
    try:
        return make_url(url)
    except (exc.ArgumentError, ValueError) as error:
        raise ConfigError(
            "The database URL (SHIFTCOST_DATABASE_URL or --database-url) is not a valid "
            "SQLAlchemy URL; use e.g. sqlite:///shiftcost.db or "
            "postgresql+psycopg2://user@host:5432/dbname."
        ) from error


def redact(url: str | URL) -> str:
    """The URL as text with every secret (password, secret query values) as ``***``: safe to print or log."""
    from shiftcost.redaction import redact_url

    return redact_url(parse_url(url).render_as_string(hide_password=False))


# Drivers for asyncio: shiftcost's engines and sessions are synchronous.
_ASYNC_DRIVERS = frozenset({"asyncpg", "aiosqlite", "psycopg_async", "aiomysql", "asyncmy"})


def json_ready(value: Any) -> Any:
    """Make a value storable in a JSON column on both databases.

    NumPy scalars and arrays become Python numbers and lists, datetimes ISO text, paths
    strings, tuples and sets lists; NaN and infinities become null, because PostgreSQL's
    JSON types refuse them.
    """
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, torch tensors
        return json_ready(value.tolist())
    raise TypeError(f"cannot store a {type(value).__name__} in a JSON column")


def _dump_json(value: Any) -> str:
    return json.dumps(json_ready(value), allow_nan=False)


def make_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """Create an engine for ``url``, configured for correct transactions on SQLite."""
    parsed = parse_url(url)
    if parsed.get_driver_name() in _ASYNC_DRIVERS:
        raise ConfigError(
            f"The database URL {redact(parsed)} names the asyncio driver {parsed.get_driver_name()}, which shiftcost "
            "cannot use; use postgresql+psycopg2:// (or sqlite:///) instead."
        )
    engine_kwargs.setdefault("json_serializer", _dump_json)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        connect_args.update(engine_kwargs.pop("connect_args", {}))
        engine = create_engine(parsed, connect_args=connect_args, **engine_kwargs)
        _configure_sqlite(engine, in_memory=parsed.database in (None, "", ":memory:"))
        return engine
    engine_kwargs.setdefault("pool_pre_ping", True)
    try:
        return create_engine(parsed, **engine_kwargs)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"The database driver for {redact(parsed)} is not installed ({error.name}); "
            "install it or use a postgresql+psycopg2:// or sqlite:/// URL."
        ) from error


def _configure_sqlite(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver; the "begin" hook below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def read_only(engine: Engine) -> Engine:
    """A view of ``engine`` whose transactions do not take SQLite's write lock."""
    return engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})


def is_disconnect(error: BaseException) -> bool:
    """True when ``error`` means the database could not be reached (not a bad statement)."""
    return isinstance(error, exc.DBAPIError) and (
        error.connection_invalidated or isinstance(error, exc.OperationalError)
    )


def unavailable(url: URL, error: BaseException) -> DatabaseUnavailableError:
    """One sentence naming the URL (password hidden) and the driver's reason."""
    from shiftcost.redaction import scrub

    reason = scrub(_driver_reason(error), url.render_as_string(hide_password=False))
    if url.get_backend_name() == "sqlite":
        fix = ("check that the file's folder exists and can be written, and that SHIFTCOST_DATABASE_URL "
               "(or --database-url) names the file you mean")
    else:
        fix = "check that the server is running and that SHIFTCOST_DATABASE_URL names the right host, database, user and password"
    return DatabaseUnavailableError(f"Cannot use the database at {redact(url)} ({reason}); {fix}.")


def _driver_reason(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    # psycopg2 puts the useful part ("password authentication failed ...") last.
    reason = lines[-1] if lines else type(original).__name__
    return reason.removeprefix("FATAL:").strip().rstrip(".")


class Database:
    """A connected database: an engine plus short-lived sessions.

    Use ``open_database()`` to get one; it checks that the server answers and that the
    schema is at the migration head.
    """

    def __init__(self, url: str | URL, **engine_kwargs: Any) -> None:
        self.url = parse_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(bind=read_only(self.engine), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises.

        On SQLite a writing session holds the database write lock from its first
        statement to its end, so keep the block short.
        """
        factory = self._read_sessions if readonly else self._sessions
        try:
            with factory() as session, session.begin():
                yield session
        except exc.DBAPIError as error:
            if is_disconnect(error) and _is_connection_failure(error):
                raise unavailable(self.url, error) from error
            if self.dialect == "sqlite" and "database is locked" in str(getattr(error, "orig", error)):
                raise DatabaseBusyError(
                    f"The SQLite database {redact(self.url)} stayed locked by another process for more than "
                    f"{SQLITE_BUSY_TIMEOUT_MS / 1000:g} s; try again once that process is done, or use PostgreSQL "
                    "for several writers at once."
                ) from error
            raise

    def ping(self) -> None:
        """Raise ``DatabaseUnavailableError`` unless the database answers."""
        try:
            with read_only(self.engine).connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except exc.DBAPIError as error:
            raise unavailable(self.url, error) from error

    def check_schema(self) -> None:
        """Raise ``SchemaVersionError`` unless the schema is at this code's migration head."""
        from shiftcost.store import migrate

        current = migrate.current_revisions(self.engine)
        heads = migrate.head_revisions()
        if set(current) == set(heads):
            return
        known = migrate.known_revisions()
        if any(revision not in known for revision in current):
            raise SchemaVersionError(
                f"The database at {redact(self.url)} has schema revision "
                f"{', '.join(current)}, newer than this shiftcost knows; upgrade shiftcost."
            )
        found = ", ".join(current) if current else "none"
        raise SchemaVersionError(
            f"The database at {redact(self.url)} has schema revision {found} but this "
            f"shiftcost needs {', '.join(heads)}; run `shiftcost db upgrade`."
        )

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _is_connection_failure(error: exc.DBAPIError) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    markers = ("could not connect", "connection", "server closed", "unable to open", "terminat")
    return error.connection_invalidated or any(marker in text for marker in markers)


def open_database(
    url: str | URL | None = None,
    *,
    check_schema: bool = True,
    upgrade: bool = False,
    **engine_kwargs: Any,
) -> Database:
    """Open the database at ``url`` (default: the ``database_url`` setting).

    ``upgrade=True`` first migrates the schema to head (handy for the embedded SQLite
    default); otherwise ``check_schema`` refuses a schema that is not at head.
    Raises ``DatabaseUnavailableError`` / ``SchemaVersionError`` with one clear sentence.
    """
    if url is None:
        from shiftcost.config import load_settings

        url = load_settings().database_url
    missing = None if upgrade or not check_schema else missing_sqlite_file(url)
    if missing is not None:
        # Connecting would create an empty file there, which a mistyped URL then leaves behind.
        raise SchemaVersionError(
            f"There is no database at {missing}: run `shiftcost db upgrade` to create it, or check SHIFTCOST_DATABASE_URL."
        )
    database = Database(url, **engine_kwargs)
    try:
        database.ping()
        if upgrade:
            from shiftcost.store import migrate

            migrate.upgrade(database.engine)
        elif check_schema:
            database.check_schema()
    except BaseException:
        database.dispose()
        raise
    return database


def missing_sqlite_file(url: str | URL) -> str | None:
    """The path of a SQLite URL's database file when the file does not exist but its folder does
    (a missing folder is the connection's own error); else None."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or parsed.query.get("uri"):
        return None
    path = parsed.database
    return path if not os.path.exists(path) and os.path.isdir(os.path.dirname(path) or ".") else None


# One Database per (process, URL): a pool is never shared across a fork, where two
# processes writing on one socket would corrupt each other's conversations.
_SHARED: dict[tuple[int, str], Database] = {}
_SHARED_LOCK = threading.Lock()


def shared_database(url: str | URL, *, upgrade: bool = False) -> Database:
    """The process's one ``Database`` for ``url``, opened (pinged, schema checked) on first use.

    Every later call in the same process gets the same engine and pool, so a step costs no
    new connection, ping or schema query. A forked child process opens its own on first
    use (the key includes the process id); the parent's pool is dropped in the child
    without closing the parent's connections. Shared databases are disposed at exit; do
    not dispose one yourself. ``upgrade`` migrates the schema to head when it is opened.
    A database that fails to open is not kept, so the next call tries again.
    """
    parsed = parse_url(url)
    key = (os.getpid(), parsed.render_as_string(hide_password=False))
    with _SHARED_LOCK:
        database = _SHARED.get(key)
        if database is None:
            database = open_database(parsed, upgrade=upgrade, check_schema=not upgrade)
            _SHARED[key] = database
        return database


def _forget_parent_databases() -> None:
    """In a forked child: drop the parent's pools without closing the parent's connections."""
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # a lock held by another parent thread would never be released here
    for database in _SHARED.values():
        database.engine.dispose(close=False)
    _SHARED.clear()


def _dispose_shared() -> None:
    pid = os.getpid()
    for (owner, _), database in list(_SHARED.items()):
        if owner == pid:
            database.dispose()
    _SHARED.clear()


os.register_at_fork(after_in_child=_forget_parent_databases)
atexit.register(_dispose_shared)


__all__ = [
    "Database",
    "DatabaseUnavailableError",
    "SchemaVersionError",
    "make_engine",
    "open_database",
    "read_only",
    "redact",
    "shared_database",
]
