"""Storage: ORM models, sessions, repositories, the budget ledger and audit queries.

Imports SQLAlchemy and Alembic only; never torch or prefect. Typical use::

    from shiftcost.store import open_database, repository, ledger

    db = open_database()                       # SHIFTCOST_DATABASE_URL or sqlite:///shiftcost.db
    with db.session() as session:
        batch, created = repository.register_batch(session, model.id, uri, fingerprint, 512, True)

The names below load ``shiftcost.store.db`` (and SQLAlchemy) on first use, so a module
that only needs the plain records (``shiftcost.store.records``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shiftcost.store.db import Database, open_database, redact

__all__ = ["Database", "open_database", "redact"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from shiftcost.store import db

        return getattr(db, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
