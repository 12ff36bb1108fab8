"""Alembic environment for shiftcost.

Run through ``shiftcost db ...`` (see ``shiftcost.store.migrate``), which hands over a
configured engine in ``config.attributes["engine"]``. Run by the ``alembic`` command
itself, the URL comes from the ``database_url`` setting (``SHIFTCOST_DATABASE_URL``).

Only this file imports the ORM models, and only for autogenerate's ``target_metadata``;
the revision scripts are frozen history and must not.
"""

from __future__ import annotations

from alembic import context

from shiftcost.store.db import make_engine
from shiftcost.store.models import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine, False
    from shiftcost.config import load_settings

    return make_engine(load_settings().database_url), True


def run_migrations_offline() -> None:
    from shiftcost.config import load_settings

    context.configure(
        url=config.get_main_option("sqlalchemy.url") or load_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine, owned = _engine()
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # Batch mode rebuilds a table by dropping it, which SQLite refuses while
                # rows elsewhere point at it; as Alembic advises, foreign keys are off
                # while the schema changes (set outside any transaction to take effect).
                connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
                render_as_batch=connection.dialect.name == "sqlite",
                # With SQLAlchemy emitting BEGIN, SQLite DDL is transactional too:
                # a failed migration leaves nothing half-applied.
                transactional_ddl=True,
                compare_type=True,
            )
            try:
                with context.begin_transaction():
                    context.run_migrations()
            finally:
                if sqlite:
                    connection.connection.driver_connection.execute("PRAGMA foreign_keys = ON")
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
