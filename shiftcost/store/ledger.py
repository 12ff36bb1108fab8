"""The budget ledger: reserve predicted cost, settle measured cost, release on failure.

Accounting rule (one place, used by ``remaining`` and by the audit):

* a reservation counts in the period of its own ``created_at``;
* while open it counts its reserved kWh / kg CO2e, once settled the *measured* amounts
  (which may exceed the reservation: reality is recorded, not clipped), once released
  nothing;
* ``remaining = cap - settled - open reservations`` in the period, so an amount is never
  counted twice and a reservation left open by a crash keeps holding its budget until
  ``release`` (``shiftcost budget release-open``) closes it;
* a run that finishes after its reservation was released still records what it measured:
  a *late settlement* (a ``settle`` entry closing the ``release`` entry), counted as
  settled in the reservation's period, so a released run's spend is never lost;
* a run closed as dead is settled at its last heartbeat's priced work; should it finish
  after all, its measure is a ``settle`` entry closing that settlement and counts in its
  place;
* what a settlement measured beyond its reservation is its *overrun*; it is part of the
  settled amount (and so of what is left) and reported on its own as well.

Only a run proven dead is released: :func:`release_open` leaves alone the reservations of
a decision whose retrain run is ``running`` with a heartbeat younger than the lease.

Budgets are validated on the way in (periods and amounts the dates and the database can
hold); a disabled budget no longer limits decisions but keeps its ledger; a budget with
ledger history cannot be deleted, only disabled.

Periods (UTC): ``per_run`` (each decision on its own against the cap), ``daily`` (calendar
day), ``monthly`` (calendar month), ``rolling_days`` (the N x 24 hours up to now). Only
calendar periods renew at a known time (:attr:`BudgetStatus.renews_at`): a rolling window
ends a microsecond after "now", so a deferral on it has no retry time.

Atomicity: every mutation locks the budget row first: ``SELECT ... FOR UPDATE`` on
PostgreSQL; on SQLite the session's ``BEGIN IMMEDIATE`` already holds the database write
lock (see ``shiftcost.store.db``). Two racing reservations are therefore serialised and
the second sees the first; a budget cannot be overspent by reservations. The UNIQUE key on
``budget_ledger.reservation_id`` makes the database itself refuse a second settle/release.

Every function takes a ``Session`` and runs in the caller's transaction: the caller decides
what commits together (``with db.session() as session:``), so a reservation and the
decision it is for are one transaction, and a refusal leaves nothing behind.

This module holds reservations and their closing (reserve, settle, release); budgets and
their validation are in ``ledger_budgets``, periods and statuses in ``ledger_status``, all
importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exc, func, select
from sqlalchemy.orm import Session, aliased

from shiftcost.errors import InputError
from shiftcost.statuses import BudgetPeriod, LedgerKind, RetrainStatus
from shiftcost.store.errors import BudgetExceededError, NotFoundError, ReservationError
from shiftcost.store.ledger_budgets import (
    _SLACK,
    MAX_ROLLING_DAYS,
    PERIOD_ALIASES,
    PERIODIC,
    _amount,
    _budget,
    _lock_budget_by_id,
    _require_session,
    _utc,
    create_budget,
    delete_budget,
    fits,
    get_budget,
    list_budgets,
    normalise_period,
    update_budget,
)
from shiftcost.store.ledger_status import (
    BudgetStatus,
    _status,
    budget_status,
    entry_effect,
    period_key,
    period_window,
    remaining,
    usage_columns,
    usage_joins,
)
from shiftcost.store.models import Budget, Decision, LedgerEntry, RetrainRun


@dataclass(frozen=True)
class Reservation:
    """An open reservation (reserved, neither settled nor released yet)."""

    id: int
    budget: str
    decision_id: int
    kwh: float
    co2: float
    created_at: datetime


# --- reserve, settle, release --------------------------------------------------------------


def reserve(
    session: Session,
    budget_name: str,
    kwh: float,
    co2: float,
    decision_id: int,
    *,
    at: datetime | None = None,
) -> int:
    """Reserve ``kwh`` / ``co2`` on a budget for a decision; returns the reservation id.

    Succeeds only if what remains in the current period covers the amounts, checked and
    written under the budget's lock; otherwise raises ``BudgetExceededError`` and writes
    nothing.
    """
    return reserve_many(session, [budget_name], kwh, co2, decision_id, at=at)[budget_name]


def reserve_many(
    session: Session,
    budget_names: Iterable[str],
    kwh: float,
    co2: float,
    decision_id: int,
    *,
    at: datetime | None = None,
) -> dict[str, int]:
    """Reserve the same amounts on several budgets, all or none; returns name -> reservation id.

    Budgets are locked in name order so two callers cannot deadlock each other.
    """
    kwh, co2 = _amount(kwh, "reserved kWh"), _amount(co2, "reserved kg CO2e")
    names = sorted(set(budget_names))
    _require_session(session)
    if session.get(Decision, decision_id) is None:
        raise NotFoundError(f"No decision with id {decision_id} exists; record the decision first.")
    now = _utc(at)
    budgets = [_budget(session, name, lock=True) for name in names]
    for budget in budgets:
        status = _status(session, budget, now, decision_id if budget.period == BudgetPeriod.PER_RUN else None)
        if not status.fits(kwh, co2):
            raise BudgetExceededError(
                f"Budget {budget.name!r} ({budget.period}) has "
                f"{_left(status.remaining_kwh, 'kWh')} and {_left(status.remaining_co2, 'kg CO2e')} "
                f"left, not enough for {kwh:.6g} kWh and {co2:.6g} kg CO2e.",
                budget=budget.name,
                remaining_kwh=status.remaining_kwh,
                remaining_co2=status.remaining_co2,
            )
    entries = {
        budget.name: LedgerEntry(
            budget_id=budget.id, decision_id=decision_id, kind=LedgerKind.RESERVE,
            energy_kwh=kwh, emissions_kg=co2, created_at=now,
        )
        for budget in budgets
    }
    session.add_all(entries.values())
    session.flush()
    return {name: entry.id for name, entry in entries.items()}


def record_spend(
    session: Session, budget_names: Iterable[str], kwh: float, co2: float, decision_id: int, reason: str
) -> list[int]:
    """Charge a spend that already happened (a forecast's probe) to a decision on each budget.

    It is a reservation settled at once with the same amounts, so every total that counts a
    settlement counts it once, and it is never refused: the energy is spent already. The
    decision's later settle or release leaves it alone (it is closed). Returns the settle ids.
    """
    kwh, co2 = _amount(kwh, "spent kWh"), _amount(co2, "spent kg CO2e")
    _require_session(session)
    ids = []
    for name in sorted(set(budget_names)):
        budget = _budget(session, name, lock=True)
        reservation = LedgerEntry(budget_id=budget.id, decision_id=decision_id, kind=LedgerKind.RESERVE, energy_kwh=kwh, emissions_kg=co2)
        session.add(reservation)
        session.flush()
        ids.append(_add_closing(session, reservation, LedgerKind.SETTLE, kwh, co2, reason))
    return ids


def _left(value: float | None, unit: str) -> str:
    return f"unlimited {unit}" if value is None else f"{max(value, 0.0):.6g} {unit}"


def settle(session: Session, reservation_id: int, kwh: float, co2: float, *, reason: str | None = None) -> int:
    """Close a reservation with the measured ``kwh`` / ``co2``; returns the settle entry id.

    Refuses (``ReservationError``, nothing written) an unknown reservation or one already
    settled or released.
    """
    kwh, co2 = _amount(kwh, "measured kWh"), _amount(co2, "measured kg CO2e")
    return _close(session, reservation_id, LedgerKind.SETTLE, kwh, co2, reason)


def release(session: Session, reservation_id: int, reason: str) -> int:
    """Close a reservation without spending it (failed or abandoned run); returns the entry id."""
    if not reason or not reason.strip():
        raise InputError("Releasing a reservation needs a reason.")
    return _close(session, reservation_id, LedgerKind.RELEASE, 0.0, 0.0, reason)


def _close(
    session: Session, reservation_id: int, kind: str, kwh: float, co2: float, reason: str | None, *, priced: bool = False
) -> int:
    _require_session(session)
    reservation = session.get(LedgerEntry, reservation_id)
    if reservation is None or reservation.kind != LedgerKind.RESERVE:
        raise ReservationError(f"There is no reservation {reservation_id}; nothing was {kind}d.")
    _lock_budget_by_id(session, reservation.budget_id)
    _refuse_if_closed(session, reservation_id, kind)
    # The unique key refuses a second close even if the lock was bypassed.
    return _add_closing(session, reservation, kind, kwh, co2, reason, priced=priced)


def _refuse_if_closed(session: Session, reservation_id: int, kind: str) -> None:
    closing = session.scalars(
        select(LedgerEntry).where(LedgerEntry.reservation_id == reservation_id)
    ).first()
    if closing is not None:
        raise ReservationError(
            f"Reservation {reservation_id} was already {closing.kind}d at "
            f"{closing.created_at:%Y-%m-%d %H:%M:%S} UTC; nothing was {kind}d."
        )


def _open_query(decision_id: int | None = None, budget_name: str | None = None,
                created_before: datetime | None = None):
    r = aliased(LedgerEntry, name="r")
    c = aliased(LedgerEntry, name="c")
    query = (
        select(r.id, Budget.name, r.decision_id, r.energy_kwh, r.emissions_kg, r.created_at)
        .join(Budget, Budget.id == r.budget_id)
        .outerjoin(c, c.reservation_id == r.id)
        .where(r.kind == LedgerKind.RESERVE, c.id.is_(None))
        .order_by(r.created_at, r.id)
    )
    if decision_id is not None:
        query = query.where(r.decision_id == decision_id)
    if budget_name is not None:
        query = query.where(Budget.name == budget_name)
    if created_before is not None:
        query = query.where(r.created_at < created_before)
    return query


def open_reservations(
    session: Session,
    older_than: timedelta | None = None,
    *,
    budget_name: str | None = None,
    decision_id: int | None = None,
    at: datetime | None = None,
) -> list[Reservation]:
    """Reservations neither settled nor released, optionally only those older than ``older_than``."""
    cutoff = _utc(at) - older_than if older_than is not None else None
    _require_session(session)
    rows = session.execute(_open_query(decision_id, budget_name, cutoff)).all()
    return [Reservation(*row) for row in rows]


#: Closes the reason of a settlement at a dead run's priced work (``LedgerEntry.priced``), for the reader.
PRICED_NOT_MEASURED = "priced, not measured"


def settle_decision(
    session: Session,
    decision_id: int,
    kwh: float,
    co2: float,
    *,
    note: str | None = None,
    priced: bool = False,
    replaces_priced: bool = False,
) -> list[int]:
    """Record a decision's measured cost on each of its reservations; returns entry ids.

    An open reservation is settled (with an ``overrun`` reason when the measure exceeds
    it); one released before the run finished gets a late settlement, so the spend
    still counts. A reservation already settled is left as it is, unless
    ``replaces_priced`` and its settlement is a dead run's priced work
    (``priced``): the run finished after all, so its measure closes that
    settlement and takes its place. A probe's spend (:func:`record_spend`) is never
    replaced. ``priced`` marks the amounts as a dead run's work priced by its last
    heartbeat rather than measured. ``note`` opens each entry's reason (a failed run's
    spend, say).
    """
    kwh, co2 = _amount(kwh, "measured kWh"), _amount(co2, "measured kg CO2e")
    _require_session(session)
    if priced:
        note = f"{note} ({PRICED_NOT_MEASURED})" if note else PRICED_NOT_MEASURED
    ids = []
    for reservation in _reservations_of(session, decision_id):
        _lock_budget_by_id(session, reservation.budget_id)
        closing = _closing(session, reservation.id)
        overrun = _overrun_reason(reservation, kwh, co2)
        if closing is None:
            ids.append(_close(session, reservation.id, LedgerKind.SETTLE, kwh, co2, _reason(note, overrun), priced=priced))
        elif closing.kind == LedgerKind.RELEASE and _closing(session, closing.id) is None:
            late = (f"late settlement: the run finished after reservation {reservation.id} was released "
                    f"({closing.reason})")
            ids.append(_add_closing(session, closing, LedgerKind.SETTLE, kwh, co2, _reason(note, late, overrun), priced=priced))
        elif replaces_priced and closing.priced and _closing(session, closing.id) is None:
            measured = (f"measured by the run, which finished after it was closed as dead, in place of the "
                        f"{closing.energy_kwh:.6g} kWh its last heartbeat priced")
            ids.append(_add_closing(session, closing, LedgerKind.SETTLE, kwh, co2, _reason(note, measured, overrun)))
    return ids


def _reason(*parts: str | None) -> str | None:
    return "; ".join(part for part in parts if part) or None


def _reservations_of(session: Session, decision_id: int) -> list[LedgerEntry]:
    query = select(LedgerEntry).where(LedgerEntry.decision_id == decision_id, LedgerEntry.kind == LedgerKind.RESERVE)
    return list(session.scalars(query.order_by(LedgerEntry.id)))


def _closing(session: Session, entry_id: int) -> LedgerEntry | None:
    return session.scalars(select(LedgerEntry).where(LedgerEntry.reservation_id == entry_id)).first()


def _add_closing(
    session: Session, closed: LedgerEntry, kind: str, kwh: float, co2: float, reason: str | None, *, priced: bool = False
) -> int:
    entry = LedgerEntry(
        budget_id=closed.budget_id, decision_id=closed.decision_id, kind=kind,
        energy_kwh=kwh, emissions_kg=co2, reservation_id=closed.id, reason=reason, priced=priced,
    )
    try:
        with session.begin_nested():
            session.add(entry)
    except exc.IntegrityError as error:
        raise ReservationError(f"Reservation {closed.id} was closed concurrently; nothing was {kind}d.") from error
    return entry.id


def _overrun_reason(reservation: LedgerEntry, kwh: float, co2: float) -> str | None:
    over = [
        # "spent", not "measured": a run killed outright is settled at its priced work.
        f"{spent:.6g} {unit} spent against {reserved:.6g} reserved"
        for spent, reserved, unit in ((kwh, reservation.energy_kwh, "kWh"), (co2, reservation.emissions_kg, "kg CO2e"))
        if spent > reserved + _SLACK * max(1.0, reserved)
    ]
    return "overrun: " + ", ".join(over) if over else None


def release_decision(session: Session, decision_id: int, reason: str) -> list[int]:
    """Release every open reservation of a decision (its run failed); returns entry ids."""
    _require_session(session)
    return [release(session, r.id, reason) for r in open_reservations(session, decision_id=decision_id)]


def live_run_condition(lease: timedelta, at: datetime | None = None) -> Any:
    """SQL condition: a retrain run is proven alive (``running``, heartbeat within ``lease``).

    Before its first heartbeat a run counts from its start.
    """
    last_seen = func.coalesce(RetrainRun.heartbeat_at, RetrainRun.started_at)
    return and_(RetrainRun.status == RetrainStatus.RUNNING, last_seen >= _utc(at) - lease)


def release_open(
    session: Session,
    older_than: timedelta,
    reason: str,
    *,
    lease: timedelta | None = None,
    budget_name: str | None = None,
    at: datetime | None = None,
    dry_run: bool = False,
) -> list[Reservation]:
    """Release the reservations still open after ``older_than`` whose run is not proven alive.

    With ``lease`` given, a reservation whose decision has a retrain run still renewing its
    heartbeat within the lease is kept, whatever its age: that run will settle it. The
    others (a run killed, or a retrain that never started) are released. ``dry_run`` lists
    them and changes nothing.
    """
    _require_session(session)
    stale = open_reservations(session, older_than, budget_name=budget_name, at=at)
    if lease is not None and stale:
        alive = set(session.scalars(
            select(RetrainRun.decision_id).where(
                RetrainRun.decision_id.in_({r.decision_id for r in stale}), live_run_condition(lease, at)
            )
        ))
        stale = [r for r in stale if r.decision_id not in alive]
    if not dry_run:
        for reservation in stale:
            release(session, reservation.id, reason)
    return stale


__all__ = [
    "MAX_ROLLING_DAYS",
    "PRICED_NOT_MEASURED",
    "PERIODIC",
    "PERIOD_ALIASES",
    "BudgetStatus",
    "Reservation",
    "budget_status",
    "create_budget",
    "delete_budget",
    "entry_effect",
    "fits",
    "live_run_condition",
    "normalise_period",
    "period_key",
    "get_budget",
    "list_budgets",
    "open_reservations",
    "period_window",
    "release",
    "release_decision",
    "release_open",
    "remaining",
    "reserve",
    "reserve_many",
    "settle",
    "settle_decision",
    "update_budget",
    "usage_columns",
    "usage_joins",
]
