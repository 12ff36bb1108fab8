"""Schema migrations: Alembic driven from code, so ``shiftcost db ...`` works from any directory.

The Alembic scripts live in the top-level ``migrations`` package shipped in the wheel;
its location is found through the import system rather than an ``alembic.ini``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from shiftcost.store.db import make_engine, read_only


def migrations_directory() -> Path:
    """The folder of the ``migrations`` package (env.py, versions/)."""
    spec = importlib.util.find_spec("migrations")
    candidates: list[Path] = []
    if spec is not None:
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
        # An editable install made before the package had its __init__ sees a namespace.
        candidates.extend(Path(entry) for entry in spec.submodule_search_locations or ())
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("the migrations package is not installed alongside shiftcost")


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic ``Config`` built in code; ``engine`` is handed to env.py unchanged.

    The URL travels as an object in ``Config.attributes``, never through the ini
    parser, so passwords with ``%`` need no escaping and are never written anywhere.
    """
    config = Config()
    directory = migrations_directory()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("version_locations", str(directory / "versions"))
    config.set_main_option("path_separator", "os")
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def _engine(target: Engine | str | URL) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return make_engine(target), True


def upgrade(target: Engine | str | URL, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest)."""
    engine, owned = _engine(target)
    try:
        command.upgrade(alembic_config(engine), revision)
    finally:
        if owned:
            engine.dispose()


def downgrade(target: Engine | str | URL, revision: str = "-1") -> None:
    """Migrate the database down to ``revision`` (``base`` removes every table)."""
    engine, owned = _engine(target)
    try:
        command.downgrade(alembic_config(engine), revision)
    finally:
        if owned:
            engine.dispose()


def current_revisions(target: Engine | str | URL) -> tuple[str, ...]:
    """The revisions the database is stamped with (empty for a database never migrated)."""
    engine, owned = _engine(target)
    try:
        with read_only(engine).connect() as connection:
            return tuple(MigrationContext.configure(connection).get_current_heads())
    finally:
        if owned:
            engine.dispose()


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revisions() -> tuple[str, ...]:
    """The newest revision(s) this code ships."""
    return tuple(_script().get_heads())


def known_revisions() -> frozenset[str]:
    """Every revision this code ships."""
    return frozenset(script.revision for script in _script().walk_revisions())
