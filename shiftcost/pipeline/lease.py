"""A running retrain proves it is alive: it renews ``retrain_runs.heartbeat_at``.

A run whose heartbeat is older than the lease (``Settings.retrain_stale_after_s``) is proven
dead: its process was killed, or cut off from the database long enough that its work is
abandoned. Only such runs are closed by the watch and released by
``shiftcost budget release-open``; age alone proves nothing (a retrain may run for hours).

The heartbeat is a daemon thread beside the run, so every step (loading, training,
building the new version, refitting) renews it, and it stops with the process. A renewal
that fails (database busy or away for a moment) is retried at the next beat; if the
database stays away longer than the lease, the run may be closed as dead, and when it
then finishes its spend is still recorded as a late settlement.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from shiftcost.store import Database

__all__ = ["heartbeat", "renew"]

_log = logging.getLogger(__name__)


def renew(db: Database, run_id: int, now: datetime | None = None) -> bool:
    """Renew the heartbeat of a ``running`` run; False if the run is no longer running."""
    from shiftcost.store import runs

    with db.session() as session:
        return runs.renew_heartbeat(session, run_id, now)


@contextmanager
def heartbeat(open_db: Callable[[], Database] | Database, run_id: int, every_s: float) -> Iterator[None]:
    """Renew the run's heartbeat every ``every_s`` seconds while the block runs.

    ``open_db`` is a ``Database`` or a callable opening one (a flow passes its settings'
    connection; the beats use their own connection either way, so the steps' transactions
    never wait for a beat).
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                if isinstance(open_db, Database):
                    alive = renew(open_db, run_id)
                else:
                    database = open_db()
                    try:
                        alive = renew(database, run_id)
                    finally:
                        database.dispose()
            except Exception as error:  # a passing fault: the next beat tries again
                _log.warning("retrain run %d: heartbeat not renewed (%s)", run_id, " ".join(str(error).split())[:200])
                continue
            if not alive:
                return  # closed (finished, or closed as dead): nothing left to prove

    thread = threading.Thread(target=beat, name=f"retrain-{run_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=max(every_s, 5.0))
