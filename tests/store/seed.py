"""Small builders for store tests: a model, a batch and a decision to hang ledger entries on."""

from __future__ import annotations

import uuid

from shiftcost.store import repository as repo


def model(session, name: str = "digits", architecture: str = "small-cnn", **kwargs):
    return repo.register_model(session, name, architecture, layers=["fc1"], classes=list(range(10)), **kwargs)


def batch(session, model_row, fingerprint: str | None = None, samples: int = 100):
    fingerprint = fingerprint or uuid.uuid4().hex
    row, _ = repo.register_batch(session, model_row.id, f"file:///landing/{fingerprint}.npz", fingerprint,
                                 samples, True)
    return row


def decision(session, model_row=None, action: str = "retrain", **kwargs):
    model_row = model_row or model(session, name=f"m-{uuid.uuid4().hex[:8]}")
    return repo.record_decision(session, batch(session, model_row).id, action, ["drift detected"], **kwargs)


def decisions(db, count: int) -> list[int]:
    """``count`` retrain decisions on one model, committed; returns their ids."""
    with db.session() as session:
        m = model(session, name=f"m-{uuid.uuid4().hex[:8]}")
        return [decision(session, m).id for _ in range(count)]


class committed:  # noqa: N801 - reads as a function: committed(db).reserve(...)
    """The ``ledger`` functions, each run in its own committed transaction of ``db``.

    What a caller holding a ``Database`` writes (``with db.session() as session:
    ledger.reserve(session, ...)``), spelt once for tests that make many ledger calls in a row.
    """

    def __init__(self, db) -> None:
        self._db = db

    def __getattr__(self, name: str):
        from shiftcost.store import ledger

        function = getattr(ledger, name)

        def in_own_transaction(*args, **kwargs):
            with self._db.session() as session:
                return function(session, *args, **kwargs)

        return in_own_transaction
