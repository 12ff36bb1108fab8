"""A running retrain proves it is alive: it renews ``retrain_runs.heartbeat_at``.

A run whose heartbeat is older than the lease (``Settings.retrain_stale_after_s``) is proven
dead: its process was killed, or cut off from the database long enough that its work is
abandoned. Only such runs are closed by the watch and released by
``shiftcost budget release-open``; age alone proves nothing (a retrain may run for hours).

The heartbeat is a daemon thread beside the run, so every step (loading, training,
building the new version, refitting) renews it, and it stops with the process. A renewal
that fails (database busy or away for a moment) is retried at the next beat; if the
database stays away longer than the lease, the run may be closed as dead, and when it
then finishes its measured spend is still recorded: as a late settlement, or in place of
the price its last heartbeat gave (below).

Each beat also stores the run's latest :class:`Progress` (``retrain_runs.progress``),
which the training loop reports at every evaluation (:func:`report`). A process killed
outright (SIGKILL, the OOM killer, a lost host) measures nothing, so the watch that closes
it settles that work at the host energy rate's price rather than nothing: a lower bound of
what the run spent, since work after its last beat is not known.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from shiftcost.store import Database

__all__ = ["Progress", "heartbeat", "renew", "report"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What a running retrain has done by its latest evaluation.

    ``spent_kwh`` and ``spent_kg`` price that work (training and evaluations, overhead
    included) at the host's energy rate and the grid's carbon intensity; both are None when
    the run has no energy rate to go by.
    """

    steps: int
    epochs: float
    spent_kwh: float | None = None
    spent_kg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Progress | None":
        """The stored progress, or None where there is none or it is not one (a row edited by
        hand must not stop the watch that closes dead runs)."""
        try:
            steps, epochs = int(data["steps"]), float(data["epochs"])
            spent_kwh, spent_kg = (_amount(data.get(name)) for name in ("spent_kwh", "spent_kg"))
        except (TypeError, KeyError, ValueError):
            return None
        return cls(steps, epochs, spent_kwh, None if spent_kwh is None else spent_kg)


def _amount(value: Any) -> float | None:
    """A stored amount that can be settled: a finite, non-negative number, else None."""
    amount = None if value is None else float(value)
    return amount if amount is not None and math.isfinite(amount) and amount >= 0 else None


# The training loop and the heartbeat thread of one run meet here, in the run's process,
# by run id: the pipeline's steps (and the flows' tasks) pass a run its inputs, not its heartbeat.
_latest: dict[int, Progress] = {}
_latest_lock = threading.Lock()


def report(run_id: int, progress: Progress) -> None:
    """Record ``progress`` as the run's latest; its next heartbeat stores it."""
    with _latest_lock:
        _latest[run_id] = progress


def _reported(run_id: int, *, forget: bool = False) -> Progress | None:
    with _latest_lock:
        return _latest.pop(run_id, None) if forget else _latest.get(run_id)


def renew(db: Database, run_id: int, now: datetime | None = None, progress: Progress | None = None) -> bool:
    """Renew the heartbeat of a ``running`` run (storing ``progress`` when given); False if the run is no longer running."""
    from shiftcost.store import runs

    with db.session() as session:
        return runs.renew_heartbeat(session, run_id, now, None if progress is None else progress.to_dict())


@contextmanager
def heartbeat(open_db: Callable[[], Database] | Database, run_id: int, every_s: float) -> Iterator[None]:
    """Renew the run's heartbeat every ``every_s`` seconds while the block runs.

    ``open_db`` is a ``Database`` or a callable opening one (a flow passes its settings'
    connection; the beats use their own connection either way, so the steps' transactions
    never wait for a beat).
    """
    stop = threading.Event()
    _reported(run_id, forget=True)  # a report left by a run of this id outside any heartbeat is not this run's

    def beat() -> None:
        while not stop.wait(every_s):
            progress = _reported(run_id)
            try:
                if isinstance(open_db, Database):
                    alive = renew(open_db, run_id, progress=progress)
                else:
                    database = open_db()
                    try:
                        alive = renew(database, run_id, progress=progress)
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
        _reported(run_id, forget=True)
