"""The budget ledger: reserve predicted cost, settle measured cost, release on failure.

Accounting rule (one place, used by ``remaining`` and by the audit):

* a reservation counts in the period of its own ``created_at``;
* while open it counts its reserved kWh / kg CO2e, once settled the *measured* amounts
  (which may exceed the reservation: reality is recorded, not clipped), once released
  nothing;
* ``remaining = cap - settled - open reservations`` in the period, so an amount is never
  counted twice and a reservation left open by a crash keeps holding its budget until
  ``release`` (``shiftcost budget release-open``) closes it.

Periods (UTC): ``per_run`` (each decision on its own against the cap), ``daily`` (calendar
day), ``monthly`` (calendar month), ``rolling_days`` (the N x 24 hours up to now).

Atomicity: every mutation locks the budget row first: ``SELECT ... FOR UPDATE`` on
PostgreSQL; on SQLite the session's ``BEGIN IMMEDIATE`` already holds the database write
lock (see ``shiftcost.store.db``). Two racing reservations are therefore serialised and
the second sees the first; a budget cannot be overspent by reservations. The UNIQUE key on
``budget_ledger.reservation_id`` makes the database itself refuse a second settle/release.

Every function takes a ``Session`` (joins the caller's transaction; the caller commits),
a ``Database`` or an ``Engine`` (runs and commits its own short transaction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, case, exc, func, select
from sqlalchemy.orm import Session, aliased

from shiftcost.errors import InputError
from shiftcost.store.db import Database
from shiftcost.store.errors import (
    BudgetError,
    BudgetExceededError,
    NotFoundError,
    ReservationError,
)
from shiftcost.store.models import BUDGET_PERIODS, Budget, Decision, LedgerEntry, utcnow

Target = Session | Database | Engine

# Float sums of many entries drift by a few ulps; never refuse a reservation for that.
_SLACK = 1e-9

PERIOD_ALIASES = {"per-run": "per_run", "rolling": "rolling_days", "rolling-days": "rolling_days"}


@dataclass(frozen=True)
class BudgetStatus:
    """A budget's caps and what its period has used, as seen at ``at``."""

    name: str
    scope: str
    period: str
    rolling_days: int | None
    kwh_cap: float | None
    co2_cap: float | None
    at: datetime
    window_start: datetime | None
    window_end: datetime | None
    settled_kwh: float
    settled_co2: float
    reserved_kwh: float
    reserved_co2: float
    open_reservations: int

    @property
    def spent_kwh(self) -> float:
        return self.settled_kwh + self.reserved_kwh

    @property
    def spent_co2(self) -> float:
        return self.settled_co2 + self.reserved_co2

    @property
    def remaining_kwh(self) -> float | None:
        """kWh still available in the period; None when energy is not capped."""
        return None if self.kwh_cap is None else self.kwh_cap - self.spent_kwh

    @property
    def remaining_co2(self) -> float | None:
        """kg CO2e still available in the period; None when carbon is not capped."""
        return None if self.co2_cap is None else self.co2_cap - self.spent_co2

    def fits(self, kwh: float, co2: float) -> bool:
        """Whether a further ``kwh`` / ``co2`` fits what remains."""
        return _fits(self.remaining_kwh, self.kwh_cap, kwh) and _fits(self.remaining_co2, self.co2_cap, co2)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (ISO timestamps), e.g. for ``decisions.budget_state``."""
        data = asdict(self)
        for key in ("at", "window_start", "window_end"):
            data[key] = data[key].isoformat() if data[key] is not None else None
        data.update(remaining_kwh=self.remaining_kwh, remaining_co2=self.remaining_co2)
        return data


@dataclass(frozen=True)
class Reservation:
    """An open reservation (reserved, neither settled nor released yet)."""

    id: int
    budget: str
    decision_id: int
    kwh: float
    co2: float
    created_at: datetime


def _fits(remaining: float | None, cap: float | None, amount: float) -> bool:
    if remaining is None or cap is None:
        return True
    return amount <= remaining + _SLACK * max(1.0, cap)


@contextmanager
def _transaction(target: Target) -> Iterator[Session]:
    if isinstance(target, Session):
        yield target
    elif isinstance(target, Database):
        with target.session() as session:
            yield session
    else:
        with Session(target, expire_on_commit=False) as session, session.begin():
            yield session


def _amount(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"The {what} must be a finite non-negative number, got {value}.")
    return value


# --- budgets -------------------------------------------------------------------------------


def create_budget(
    target: Target,
    name: str,
    *,
    period: str,
    kwh_cap: float | None = None,
    co2_cap: float | None = None,
    scope: str = "*",
    rolling_days: int | None = None,
    description: str | None = None,
) -> Budget:
    """Create a budget; refuses negative or missing caps, unknown periods and duplicate names.

    ``scope`` is a model name, or ``*`` for every model. Nothing is written when refused.
    """
    period = PERIOD_ALIASES.get(period, period)
    if not name or not name.strip():
        raise BudgetError("A budget needs a non-empty name.")
    if period not in BUDGET_PERIODS:
        raise BudgetError(
            f"Budget {name!r} has unknown period {period!r}; use one of {', '.join(BUDGET_PERIODS)}."
        )
    if kwh_cap is None and co2_cap is None:
        raise BudgetError(f"Budget {name!r} needs a kWh cap, a kg CO2e cap, or both.")
    for what, cap in (("kWh", kwh_cap), ("kg CO2e", co2_cap)):
        if cap is not None and (not math.isfinite(cap) or cap < 0):
            raise BudgetError(f"Budget {name!r} has a {what} cap of {cap}; caps must be zero or more.")
    if period == "rolling_days":
        if rolling_days is None or rolling_days < 1:
            raise BudgetError(f"Budget {name!r} is rolling and needs --rolling-days of 1 or more.")
    elif rolling_days is not None:
        raise BudgetError(f"Budget {name!r} has period {period}; rolling days apply only to rolling_days.")
    with _transaction(target) as session:
        if session.scalar(select(Budget.id).where(Budget.name == name)) is not None:
            raise BudgetError(f"A budget named {name!r} already exists; choose another name.")
        budget = Budget(
            name=name,
            scope=scope,
            period=period,
            rolling_days=rolling_days,
            kwh_cap=None if kwh_cap is None else float(kwh_cap),
            co2_cap=None if co2_cap is None else float(co2_cap),
            description=description,
        )
        try:
            with session.begin_nested():
                session.add(budget)
        except exc.IntegrityError as error:
            raise BudgetError(f"A budget named {name!r} already exists; choose another name.") from error
        return budget


def get_budget(target: Target, name: str) -> Budget:
    """A budget by name, or ``NotFoundError``."""
    with _transaction(target) as session:
        return _budget(session, name)


def list_budgets(target: Target, model_name: str | None = None) -> list[Budget]:
    """Every budget, or those applying to ``model_name`` (its own scope or ``*``), by name."""
    with _transaction(target) as session:
        query = select(Budget).order_by(Budget.name)
        if model_name is not None:
            query = query.where(Budget.scope.in_([model_name, "*"]))
        return list(session.scalars(query))


def _budget(session: Session, name: str, *, lock: bool = False) -> Budget:
    query = select(Budget).where(Budget.name == name).execution_options(populate_existing=True)
    budget = session.scalars(query.with_for_update() if lock else query).first()
    if budget is None:
        raise NotFoundError(f"No budget named {name!r} exists; create it with `shiftcost budget create`.")
    return budget


def _lock_budget_by_id(session: Session, budget_id: int) -> Budget:
    query = select(Budget).where(Budget.id == budget_id).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


# --- periods and what they have used ----------------------------------------------------------


def period_window(budget: Budget, at: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """The ``[start, end)`` window of the budget's period containing ``at`` (UTC).

    ``per_run`` budgets have no window (each decision stands alone): ``(None, None)``.
    """
    at = _utc(at)
    if budget.period == "per_run":
        return None, None
    if budget.period == "daily":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if budget.period == "monthly":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    assert budget.rolling_days is not None
    return at - timedelta(days=budget.rolling_days), at + timedelta(microseconds=1)


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return utcnow()
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _usage_query(budget_id: int, start: datetime | None, end: datetime | None, decision_id: int | None):
    """SQL: settled and still-open amounts of the reservations of one budget in a window.

    SELECT sum(CASE WHEN c.kind = 'settle' THEN c.energy_kwh ELSE 0 END)   AS settled_kwh,
           sum(CASE WHEN c.id IS NULL THEN r.energy_kwh ELSE 0 END)        AS reserved_kwh,
           ... (same for emissions_kg), count(r.id) FILTER (c.id IS NULL)  AS open
    FROM budget_ledger r LEFT JOIN budget_ledger c ON c.reservation_id = r.id
    WHERE r.budget_id = :budget AND r.kind = 'reserve'
      AND r.created_at >= :start AND r.created_at < :end      -- calendar / rolling periods
      AND r.decision_id = :decision                           -- per-run budgets
    """
    r = aliased(LedgerEntry, name="r")
    c = aliased(LedgerEntry, name="c")
    is_open = c.id.is_(None)
    settled = c.kind == "settle"
    query = (
        select(
            func.coalesce(func.sum(case((settled, c.energy_kwh), else_=0.0)), 0.0),
            func.coalesce(func.sum(case((settled, c.emissions_kg), else_=0.0)), 0.0),
            func.coalesce(func.sum(case((is_open, r.energy_kwh), else_=0.0)), 0.0),
            func.coalesce(func.sum(case((is_open, r.emissions_kg), else_=0.0)), 0.0),
            func.coalesce(func.sum(case((is_open, 1), else_=0)), 0),
        )
        .select_from(r)
        .outerjoin(c, c.reservation_id == r.id)
        .where(r.budget_id == budget_id, r.kind == "reserve")
    )
    if start is not None and end is not None:
        query = query.where(r.created_at >= start, r.created_at < end)
    if decision_id is not None:
        query = query.where(r.decision_id == decision_id)
    return query


def _status(session: Session, budget: Budget, at: datetime, decision_id: int | None = None) -> BudgetStatus:
    start, end = period_window(budget, at)
    if budget.period == "per_run" and decision_id is None:
        settled_kwh = settled_co2 = reserved_kwh = reserved_co2 = 0.0
        open_count = 0
    else:
        row = session.execute(_usage_query(budget.id, start, end, decision_id)).one()
        settled_kwh, settled_co2, reserved_kwh, reserved_co2, open_count = row
    return BudgetStatus(
        name=budget.name,
        scope=budget.scope,
        period=budget.period,
        rolling_days=budget.rolling_days,
        kwh_cap=budget.kwh_cap,
        co2_cap=budget.co2_cap,
        at=at,
        window_start=start,
        window_end=end,
        settled_kwh=float(settled_kwh),
        settled_co2=float(settled_co2),
        reserved_kwh=float(reserved_kwh),
        reserved_co2=float(reserved_co2),
        open_reservations=int(open_count),
    )


def remaining(
    target: Target, budget_name: str, at: datetime | None = None, *, decision_id: int | None = None
) -> BudgetStatus:
    """What the budget's period containing ``at`` (default now) has used and has left.

    For a ``per_run`` budget the figures are those of ``decision_id`` (nothing used when
    None, i.e. the whole cap is available to a new run).
    """
    with _transaction(target) as session:
        return _status(session, _budget(session, budget_name), _utc(at), decision_id)


def budget_status(
    target: Target, model_name: str | None = None, at: datetime | None = None
) -> list[BudgetStatus]:
    """The status of every budget applying to ``model_name`` (all budgets when None)."""
    at = _utc(at)
    with _transaction(target) as session:
        return [_status(session, budget, at) for budget in list_budgets(session, model_name)]


# --- reserve, settle, release --------------------------------------------------------------


def reserve(
    target: Target,
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
    return reserve_many(target, [budget_name], kwh, co2, decision_id, at=at)[budget_name]


def reserve_many(
    target: Target,
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
    with _transaction(target) as session:
        if session.get(Decision, decision_id) is None:
            raise NotFoundError(f"No decision with id {decision_id} exists; record the decision first.")
        now = _utc(at)
        budgets = [_budget(session, name, lock=True) for name in names]
        for budget in budgets:
            status = _status(session, budget, now, decision_id if budget.period == "per_run" else None)
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
                budget_id=budget.id, decision_id=decision_id, kind="reserve",
                energy_kwh=kwh, emissions_kg=co2, created_at=now,
            )
            for budget in budgets
        }
        session.add_all(entries.values())
        session.flush()
        return {name: entry.id for name, entry in entries.items()}


def _left(value: float | None, unit: str) -> str:
    return f"unlimited {unit}" if value is None else f"{max(value, 0.0):.6g} {unit}"


def settle(target: Target, reservation_id: int, kwh: float, co2: float, *, reason: str | None = None) -> int:
    """Close a reservation with the measured ``kwh`` / ``co2``; returns the settle entry id.

    Refuses (``ReservationError``, nothing written) an unknown reservation or one already
    settled or released.
    """
    kwh, co2 = _amount(kwh, "measured kWh"), _amount(co2, "measured kg CO2e")
    return _close(target, reservation_id, "settle", kwh, co2, reason)


def release(target: Target, reservation_id: int, reason: str) -> int:
    """Close a reservation without spending it (failed or abandoned run); returns the entry id."""
    if not reason or not reason.strip():
        raise InputError("Releasing a reservation needs a reason.")
    return _close(target, reservation_id, "release", 0.0, 0.0, reason)


def _close(target: Target, reservation_id: int, kind: str, kwh: float, co2: float, reason: str | None) -> int:
    with _transaction(target) as session:
        reservation = session.get(LedgerEntry, reservation_id)
        if reservation is None or reservation.kind != "reserve":
            raise ReservationError(f"There is no reservation {reservation_id}; nothing was {kind}d.")
        _lock_budget_by_id(session, reservation.budget_id)
        _refuse_if_closed(session, reservation_id, kind)
        entry = LedgerEntry(
            budget_id=reservation.budget_id, decision_id=reservation.decision_id, kind=kind,
            energy_kwh=kwh, emissions_kg=co2, reservation_id=reservation_id, reason=reason,
        )
        try:
            with session.begin_nested():
                session.add(entry)
        except exc.IntegrityError as error:
            # Only reachable if the lock was bypassed; the unique key still refuses it.
            raise ReservationError(
                f"Reservation {reservation_id} was closed concurrently; nothing was {kind}d."
            ) from error
        return entry.id


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
        .where(r.kind == "reserve", c.id.is_(None))
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
    target: Target,
    older_than: timedelta | None = None,
    *,
    budget_name: str | None = None,
    decision_id: int | None = None,
    at: datetime | None = None,
) -> list[Reservation]:
    """Reservations neither settled nor released, optionally only those older than ``older_than``."""
    cutoff = _utc(at) - older_than if older_than is not None else None
    with _transaction(target) as session:
        rows = session.execute(_open_query(decision_id, budget_name, cutoff)).all()
        return [Reservation(*row) for row in rows]


def settle_decision(target: Target, decision_id: int, kwh: float, co2: float) -> list[int]:
    """Settle every open reservation of a decision with the measured cost; returns entry ids."""
    with _transaction(target) as session:
        return [settle(session, r.id, kwh, co2) for r in open_reservations(session, decision_id=decision_id)]


def release_decision(target: Target, decision_id: int, reason: str) -> list[int]:
    """Release every open reservation of a decision (its run failed); returns entry ids."""
    with _transaction(target) as session:
        return [release(session, r.id, reason) for r in open_reservations(session, decision_id=decision_id)]


def release_open(
    target: Target,
    older_than: timedelta,
    reason: str,
    *,
    budget_name: str | None = None,
    at: datetime | None = None,
) -> list[Reservation]:
    """Release every reservation still open after ``older_than`` (left by a crashed run)."""
    with _transaction(target) as session:
        stale = open_reservations(session, older_than, budget_name=budget_name, at=at)
        for reservation in stale:
            release(session, reservation.id, reason)
        return stale


__all__ = [
    "BudgetStatus",
    "Reservation",
    "budget_status",
    "create_budget",
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
]
