"""Shared fixtures: migrated empty databases on SQLite and on the real PostgreSQL.

``database_url`` is parametrised over ``sqlite`` (a temporary file) and ``postgres`` (a
fresh schema ``test_<uuid>`` in the database at ``SHIFTCOST_TEST_POSTGRES_URL``, selected
through ``search_path`` in the URL and dropped afterwards), so every test using it runs
on both. PostgreSQL cases carry ``@pytest.mark.postgres``.

When PostgreSQL cannot be reached its cases are skipped, unless
``SHIFTCOST_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then they fail, and the session
fails if any postgres-marked test was skipped or none ran (checked on the controller,
so it works under pytest-xdist too).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import settings

# Property tests are checked for what they assert, not for how fast an example runs: on a loaded
# 2-core machine a forecaster fit took 246 ms, past Hypothesis's 200 ms default deadline.
settings.register_profile("shiftcost", deadline=None)
settings.load_profile("shiftcost")

POSTGRES_URL = os.environ.get(
    "SHIFTCOST_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("SHIFTCOST_REQUIRE_POSTGRES") == "1"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@functools.cache
def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used for tests, or None when it can."""
    try:
        from sqlalchemy import create_engine

        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as error:  # any failure means: not usable here
        return f"PostgreSQL at {POSTGRES_URL} is unreachable: {str(error).splitlines()[0]}"
    return None


def require_postgres() -> None:
    """Skip (or, when PostgreSQL is mandatory, fail) the current test if it is unreachable."""
    problem = postgres_problem()
    if problem is None:
        return
    if REQUIRE_POSTGRES:
        pytest.fail(f"{problem} (SHIFTCOST_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(problem)


def postgres_schema_url(schema: str) -> str:
    """The test server's URL with ``search_path`` set to ``schema``.

    Commits do not wait for the disk (``synchronous_commit=off``): durability is not what
    these tests check, and waiting for it would make the ledger races slow.
    """
    separator = "&" if "?" in POSTGRES_URL else "?"
    options = f"-csearch_path={schema} -csynchronous_commit=off"
    return f"{POSTGRES_URL}{separator}options={quote(options)}"


@contextmanager
def postgres_schema(*, migrated: bool = False) -> Iterator[str]:
    """A fresh schema on the test server (empty, or ``migrated`` to head); yields a URL using it.

    The schema is dropped afterwards, so parallel runs and workers never collide.
    """
    from sqlalchemy import create_engine

    require_postgres()
    schema = f"test_{uuid.uuid4().hex}"
    admin = create_engine(POSTGRES_URL, connect_args={"options": "-csynchronous_commit=off"})
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            if migrated:
                connection.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
                connection.exec_driver_sql(postgres_migration_script())
        yield postgres_schema_url(schema)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@functools.cache
def postgres_migration_script() -> str:
    """The migrations to head as PostgreSQL SQL (Alembic offline mode), rendered once.

    Running this script in a fresh schema gives exactly what ``shiftcost db upgrade``
    creates, in a fraction of the time; the migration tests run Alembic itself.
    """
    import io

    from alembic import command

    from shiftcost.store.migrate import alembic_config

    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg2://")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    script = config.output_buffer.getvalue()
    # The script brings its own BEGIN/COMMIT; the caller's transaction wraps it instead.
    return script.replace("BEGIN;", "", 1).rsplit("COMMIT;", 1)[0]


@pytest.fixture(scope="session")
def _migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated to head, copied for each test (migrating is the slow part)."""
    from shiftcost.store import migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``."""
    return request.param


@pytest.fixture
def empty_database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty, unmigrated database URL (SQLite file or fresh PostgreSQL schema)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty database URL, on SQLite and on PostgreSQL (one test each)."""
    if backend == "sqlite":
        template = request.getfixturevalue("_migrated_sqlite_template")
        path = tmp_path / "shiftcost.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
    else:
        with postgres_schema(migrated=True) as url:
            yield url


@pytest.fixture
def postgres_database_url() -> Iterator[str]:
    """A migrated, empty PostgreSQL schema only (for tests about server behaviour); mark the
    test ``@pytest.mark.postgres``."""
    with postgres_schema(migrated=True) as url:
        yield url


@pytest.fixture
def postgres_admin_url() -> str:
    """The test server's URL itself (no schema), e.g. to act on connections as an operator."""
    require_postgres()
    return POSTGRES_URL


@pytest.fixture
def db(database_url: str):
    """An open ``shiftcost.store.Database`` on ``database_url``; disposed after the test."""
    from shiftcost.store import open_database

    database = open_database(database_url)
    yield database
    database.dispose()


# --- PostgreSQL must really run in CI --------------------------------------------------------

# Counted per process; under xdist the controller receives every worker's reports.
_PG_STATS = {"ran": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "postgres" not in report.keywords:
        return
    if report.skipped:
        _PG_STATS["skipped"] += 1
    elif report.when == "call":
        _PG_STATS["ran"] += 1


def _postgres_shortfall(config: pytest.Config) -> str | None:
    if not REQUIRE_POSTGRES or hasattr(config, "workerinput"):
        return None
    if _PG_STATS["skipped"]:
        return f"{_PG_STATS['skipped']} PostgreSQL test(s) were skipped but SHIFTCOST_REQUIRE_POSTGRES=1"
    if _PG_STATS["ran"] == 0:
        return "no PostgreSQL test ran but SHIFTCOST_REQUIRE_POSTGRES=1"
    return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _postgres_shortfall(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    shortfall = _postgres_shortfall(config)
    if shortfall:
        terminalreporter.section("PostgreSQL required", red=True)
        terminalreporter.line(f"FAILED: {shortfall}", red=True)


def pytest_configure(config: pytest.Config) -> None:
    # Several pytest-xdist workers each running torch's default thread pool oversubscribe
    # the cores; small models then run many times slower than on one thread.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(1)
