"""Storage: ORM models, sessions, repositories, the budget ledger and audit queries.

Imports SQLAlchemy and Alembic only; never torch or prefect. Typical use::

    from shiftcost.store import open_database, repository, ledger

    db = open_database()                       # SHIFTCOST_DATABASE_URL or sqlite:///shiftcost.db
    with db.session() as session:
        batch, created = repository.register_batch(session, model.id, uri, fingerprint, 512, True)
"""

from shiftcost.store.db import Database, open_database, redact

__all__ = ["Database", "open_database", "redact"]
