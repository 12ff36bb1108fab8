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

from sqlalchemy import Engine, and_, case, exc, func, select
from sqlalchemy.orm import Session, aliased

from shiftcost.errors import ConfigError, InputError
from shiftcost.store.db import Database
from shiftcost.store.errors import (
    BudgetError,
    BudgetExceededError,
    NotFoundError,
    ReservationError,
)
from shiftcost.store.models import BUDGET_PERIODS, Budget, Decision, LedgerEntry, RetrainRun, utcnow

Target = Session | Database | Engine

# Float sums of many entries drift by a few ulps; never refuse a reservation for that.
_SLACK = 1e-9

PERIOD_ALIASES = {"per-run": "per_run", "rolling": "rolling_days", "rolling-days": "rolling_days"}
#: Budget periods whose cap renews, so waiting can make room.
PERIODIC = frozenset({"daily", "monthly", "rolling_days"})
#: The longest rolling window: far enough back for any use, near enough that ``now - N
#: days`` is a date every backend (and Python) can hold.
MAX_ROLLING_DAYS = 36_600
#: Names and scopes are VARCHAR(200).
_MAX_NAME = 200
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)


def normalise_period(period: str) -> str:
    """The canonical period name (``rolling`` -> ``rolling_days``), unchanged if unknown."""
    return PERIOD_ALIASES.get(period, period)


def fits(amount: float, room: float | None, cap: float | None) -> bool:
    """Whether ``amount`` fits ``room`` left of ``cap`` (an uncapped measure always fits).

    Sums of many float ledger entries drift by a few ulps; never refuse an amount for that.
    """
    if room is None or cap is None:
        return True
    return amount <= room + _SLACK * max(1.0, cap)


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
    late_kwh: float = 0.0
    """Part of ``settled_kwh`` recorded by runs that finished after their reservation was released."""
    late_co2: float = 0.0
    overrun_kwh: float = 0.0
    """Part of ``settled_kwh`` that runs measured beyond what they had reserved."""
    overrun_co2: float = 0.0
    disabled: bool = False

    @classmethod
    def planned(
        cls,
        name: str,
        scope: str = "*",
        period: str = "per_run",
        kwh_cap: float | None = None,
        co2_cap: float | None = None,
        remaining_kwh: float | None = None,
        remaining_co2: float | None = None,
        window_start: datetime | None = None,
        window_end: datetime | None = None,
    ) -> BudgetStatus:
        """A status stated by its caps and what remains (a what-if, or a test), not read from the ledger.

        A remaining amount left out means the whole cap remains. Refuses unknown periods and
        negative or non-finite caps (``ConfigError``).
        """
        period = normalise_period(period)
        if period not in BUDGET_PERIODS:
            raise ConfigError(f"budget {name!r} has period {period!r}; use one of {', '.join(BUDGET_PERIODS)}.")
        used = []
        for measure, cap, left in (("kwh", kwh_cap, remaining_kwh), ("co2", co2_cap, remaining_co2)):
            if cap is not None and (not math.isfinite(cap) or cap < 0):
                raise ConfigError(f"budget {name!r} has {measure}_cap {cap!r}; caps are finite and not negative.")
            used.append(0.0 if cap is None or left is None else float(cap) - float(left))
        return cls(
            name=name, scope=scope, period=period, rolling_days=None, kwh_cap=kwh_cap, co2_cap=co2_cap,
            at=window_start or _EARLIEST, window_start=window_start, window_end=window_end,
            settled_kwh=used[0], settled_co2=used[1], reserved_kwh=0.0, reserved_co2=0.0, open_reservations=0,
        )

    @property
    def periodic(self) -> bool:
        """Whether the cap renews, so that waiting can make room."""
        return self.period in PERIODIC

    @property
    def renews_at(self) -> datetime | None:
        """When the current period ends and the cap is whole again: calendar periods only.

        A rolling window slides (it ends a microsecond after ``at``), so it has no such time:
        a batch deferred on it would otherwise be requeued at every poll.
        """
        return self.window_end if self.period in ("daily", "monthly") else None

    def applies_to(self, model_name: str | None) -> bool:
        """Whether the budget limits ``model_name`` (every enabled budget does when it is None)."""
        return not self.disabled and (model_name is None or self.scope in ("*", model_name))

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
        return fits(kwh, self.remaining_kwh, self.kwh_cap) and fits(co2, self.remaining_co2, self.co2_cap)

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


def _validated(name: str, period: str, kwh_cap: float | None, co2_cap: float | None, scope: str,
               rolling_days: int | None) -> str:
    """The canonical period, once the definition is one the dates and the database can hold."""
    period = normalise_period(period)
    if not name or not name.strip():
        raise BudgetError("A budget needs a non-empty name.")
    if len(name) > _MAX_NAME or len(scope) > _MAX_NAME:
        raise BudgetError(f"Budget names and scopes are at most {_MAX_NAME} characters; shorten {name[:40]!r}.")
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
        if rolling_days > MAX_ROLLING_DAYS:
            raise BudgetError(
                f"Budget {name!r} has --rolling-days {rolling_days}; use at most {MAX_ROLLING_DAYS} (100 years)."
            )
    elif rolling_days is not None:
        raise BudgetError(f"Budget {name!r} has period {period}; rolling days apply only to rolling_days.")
    return period


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
    period = _validated(name, period, kwh_cap, co2_cap, scope, rolling_days)
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


_UNCHANGED: Any = object()


def update_budget(
    target: Target,
    name: str,
    *,
    period: str | None = None,
    kwh_cap: float | None = _UNCHANGED,
    co2_cap: float | None = _UNCHANGED,
    scope: str | None = None,
    rolling_days: int | None = _UNCHANGED,
    description: str | None = _UNCHANGED,
    enabled: bool | None = None,
) -> Budget:
    """Change a budget's definition (what is not given stays); validated like a new budget.

    The ledger is untouched: past reservations keep counting in the periods of their own
    times, under the new caps. ``enabled=False`` disables the budget (it no longer limits
    decisions; open reservations on it still settle or release), ``True`` enables it again.
    """
    with _transaction(target) as session:
        budget = _budget(session, name, lock=True)
        new_period = normalise_period(period) if period is not None else budget.period
        if rolling_days is _UNCHANGED:
            rolling_days = budget.rolling_days if new_period == "rolling_days" else None
        values = {
            "period": new_period,
            "kwh_cap": budget.kwh_cap if kwh_cap is _UNCHANGED else kwh_cap,
            "co2_cap": budget.co2_cap if co2_cap is _UNCHANGED else co2_cap,
            "scope": budget.scope if scope is None else scope,
            "rolling_days": rolling_days,
        }
        values["period"] = _validated(name, values["period"], values["kwh_cap"], values["co2_cap"],
                                      values["scope"], values["rolling_days"])
        for key, value in values.items():
            setattr(budget, key, float(value) if key.endswith("_cap") and value is not None else value)
        if description is not _UNCHANGED:
            budget.description = description
        if enabled is not None:
            budget.disabled_at = None if enabled else (budget.disabled_at or utcnow())
        session.flush()
        return budget


def delete_budget(target: Target, name: str) -> None:
    """Delete a budget that has never been used; one with ledger entries is refused.

    The ledger is the history the audit answers from, so it is never deleted: a used
    budget is disabled instead (``update_budget(..., enabled=False)``).
    """
    with _transaction(target) as session:
        budget = _budget(session, name, lock=True)
        used = session.scalar(select(func.count(LedgerEntry.id)).where(LedgerEntry.budget_id == budget.id))
        if used:
            raise BudgetError(
                f"Budget {name!r} has {used} ledger entries, which are kept as history; "
                f"disable it instead with `shiftcost budget disable {name}`."
            )
        session.delete(budget)
        session.flush()


def get_budget(target: Target, name: str) -> Budget:
    """A budget by name, or ``NotFoundError``."""
    with _transaction(target) as session:
        return _budget(session, name)


def list_budgets(target: Target, model_name: str | None = None, *, include_disabled: bool = True) -> list[Budget]:
    """Every budget, or those applying to ``model_name`` (its own scope or ``*``), by name."""
    with _transaction(target) as session:
        query = select(Budget).order_by(Budget.name)
        if model_name is not None:
            query = query.where(Budget.scope.in_([model_name, "*"]))
        if not include_disabled:
            query = query.where(Budget.disabled_at.is_(None))
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
    # A window reaching back before year 1 (a budget written before validation) starts there.
    days = min(budget.rolling_days, (at - _EARLIEST).days)
    return at - timedelta(days=days), at + timedelta(microseconds=1)


def period_key(period: str, at: datetime) -> Any:
    """Which period of a ``period`` budget the time ``at`` falls in, as a hashable key.

    Calendar periods restart at their boundary; ``per_run`` and rolling budgets have no
    calendar period (None: one running series).
    """
    at = _utc(at)
    if period == "monthly":
        return (at.year, at.month)
    if period == "daily":
        return at.date()
    return None


def entry_effect(kind: str, amount: float, closed_amount: float | None) -> float:
    """How one ledger entry changes what its reservation's period has used.

    ``closed_amount`` is the amount of the entry it closes (None for a reservation). A
    reservation adds what it holds; a release gives it back; a settlement replaces it by
    the measure. A late settlement closes a release (which holds nothing), so it adds its
    whole measure.
    """
    if kind == "reserve":
        return amount
    if kind == "release":
        return -(closed_amount or 0.0)
    return amount - (closed_amount or 0.0)


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return utcnow()
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def usage_columns(r: Any, c: Any, late: Any) -> dict[str, Any]:
    """Per-reservation SQL expressions of the accounting rule (one place; the audit uses them).

    ``r`` is the reservation, ``c`` the entry closing it (settle or release) and ``late`` a
    late settlement closing that release, each outer-joined (NULL when absent)::

        measured = CASE WHEN c.kind = 'settle' THEN c.energy_kwh
                        WHEN late.id IS NOT NULL THEN late.energy_kwh ELSE 0 END
        held     = CASE WHEN c.id IS NULL THEN r.energy_kwh ELSE 0 END      -- still open
        overrun  = CASE WHEN measured > r.energy_kwh THEN measured - r.energy_kwh ELSE 0 END
    """
    columns: dict[str, Any] = {}
    for measure, column in (("kwh", "energy_kwh"), ("co2", "emissions_kg")):
        reserved = getattr(r, column)
        measured = case((c.kind == "settle", getattr(c, column)), (late.id.is_not(None), getattr(late, column)), else_=0.0)
        columns[f"settled_{measure}"] = measured
        columns[f"reserved_{measure}"] = case((c.id.is_(None), reserved), else_=0.0)
        columns[f"late_{measure}"] = case((late.id.is_not(None), getattr(late, column)), else_=0.0)
        columns[f"overrun_{measure}"] = case((measured > reserved, measured - reserved), else_=0.0)
    columns["open"] = case((c.id.is_(None), 1), else_=0)
    columns["released"] = case((c.kind == "release", 1), else_=0)
    return columns


def usage_joins(query: Any) -> tuple[Any, Any, Any, Any]:
    """``query`` selecting from reservations ``r`` joined to their closing entry ``c`` and late settlement."""
    r = aliased(LedgerEntry, name="r")
    c = aliased(LedgerEntry, name="c")
    late = aliased(LedgerEntry, name="late")
    joined = (
        query.select_from(r)
        .outerjoin(c, c.reservation_id == r.id)
        .outerjoin(late, and_(late.reservation_id == c.id, late.kind == "settle"))
        .where(r.kind == "reserve")
    )
    return joined, r, c, late


_USAGE = ("settled_kwh", "settled_co2", "reserved_kwh", "reserved_co2", "open",
          "late_kwh", "late_co2", "overrun_kwh", "overrun_co2")


def _usage_query(budget_id: int, start: datetime | None, end: datetime | None, decision_id: int | None):
    """SQL: what the reservations of one budget in a window have used (see ``usage_columns``).

    SELECT sum(measured), sum(held), ..., sum(late), sum(overrun), count of open
    FROM budget_ledger r LEFT JOIN budget_ledger c ON c.reservation_id = r.id
         LEFT JOIN budget_ledger late ON late.reservation_id = c.id AND late.kind = 'settle'
    WHERE r.budget_id = :budget AND r.kind = 'reserve'
      AND r.created_at >= :start AND r.created_at < :end      -- calendar / rolling periods
      AND r.decision_id = :decision                           -- per-run budgets
    """
    query, r, c, late = usage_joins(select())
    columns = usage_columns(r, c, late)
    query = query.add_columns(*(func.coalesce(func.sum(columns[key]), 0) for key in _USAGE)).where(r.budget_id == budget_id)
    if start is not None and end is not None:
        query = query.where(r.created_at >= start, r.created_at < end)
    if decision_id is not None:
        query = query.where(r.decision_id == decision_id)
    return query


def _status(session: Session, budget: Budget, at: datetime, decision_id: int | None = None) -> BudgetStatus:
    start, end = period_window(budget, at)
    if budget.period == "per_run" and decision_id is None:
        usage = dict.fromkeys(_USAGE, 0.0)
    else:
        usage = dict(zip(_USAGE, session.execute(_usage_query(budget.id, start, end, decision_id)).one(), strict=True))
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
        open_reservations=int(usage.pop("open")),
        disabled=budget.disabled_at is not None,
        **{key: float(value) for key, value in usage.items()},
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
    target: Target, model_name: str | None = None, at: datetime | None = None, *, include_disabled: bool = False
) -> list[BudgetStatus]:
    """The status of every enabled budget applying to ``model_name`` (all budgets when None)."""
    at = _utc(at)
    with _transaction(target) as session:
        budgets = list_budgets(session, model_name, include_disabled=include_disabled)
        return [_status(session, budget, at) for budget in budgets]


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
        # The unique key refuses a second close even if the lock was bypassed.
        return _add_closing(session, reservation, kind, kwh, co2, reason)


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


def settle_decision(target: Target, decision_id: int, kwh: float, co2: float, *, note: str | None = None) -> list[int]:
    """Record a decision's measured cost on each of its reservations; returns entry ids.

    An open reservation is settled (with an ``overrun`` reason when the measure exceeds
    it); one released before the run finished gets a late settlement, so the spend
    still counts. A reservation already settled is left as it is. ``note`` opens each
    entry's reason (a failed run's spend, say).
    """
    kwh, co2 = _amount(kwh, "measured kWh"), _amount(co2, "measured kg CO2e")
    with _transaction(target) as session:
        ids = []
        for reservation in _reservations_of(session, decision_id):
            _lock_budget_by_id(session, reservation.budget_id)
            closing = _closing(session, reservation.id)
            overrun = _overrun_reason(reservation, kwh, co2)
            if closing is None:
                ids.append(_close(session, reservation.id, "settle", kwh, co2, _reason(note, overrun)))
            elif closing.kind == "release" and _closing(session, closing.id) is None:
                late = (f"late settlement: the run finished after reservation {reservation.id} was released "
                        f"({closing.reason})")
                ids.append(_add_closing(session, closing, "settle", kwh, co2, _reason(note, late, overrun)))
        return ids


def _reason(*parts: str | None) -> str | None:
    return "; ".join(part for part in parts if part) or None


def _reservations_of(session: Session, decision_id: int) -> list[LedgerEntry]:
    query = select(LedgerEntry).where(LedgerEntry.decision_id == decision_id, LedgerEntry.kind == "reserve")
    return list(session.scalars(query.order_by(LedgerEntry.id)))


def _closing(session: Session, entry_id: int) -> LedgerEntry | None:
    return session.scalars(select(LedgerEntry).where(LedgerEntry.reservation_id == entry_id)).first()


def _add_closing(session: Session, closed: LedgerEntry, kind: str, kwh: float, co2: float, reason: str | None) -> int:
    entry = LedgerEntry(
        budget_id=closed.budget_id, decision_id=closed.decision_id, kind=kind,
        energy_kwh=kwh, emissions_kg=co2, reservation_id=closed.id, reason=reason,
    )
    try:
        with session.begin_nested():
            session.add(entry)
    except exc.IntegrityError as error:
        raise ReservationError(f"Reservation {closed.id} was closed concurrently; nothing was {kind}d.") from error
    return entry.id


def _overrun_reason(reservation: LedgerEntry, kwh: float, co2: float) -> str | None:
    over = [
        f"{measured:.6g} {unit} measured against {reserved:.6g} reserved"
        for measured, reserved, unit in ((kwh, reservation.energy_kwh, "kWh"), (co2, reservation.emissions_kg, "kg CO2e"))
        if measured > reserved + _SLACK * max(1.0, reserved)
    ]
    return "overrun: " + ", ".join(over) if over else None


def release_decision(target: Target, decision_id: int, reason: str) -> list[int]:
    """Release every open reservation of a decision (its run failed); returns entry ids."""
    with _transaction(target) as session:
        return [release(session, r.id, reason) for r in open_reservations(session, decision_id=decision_id)]


def live_run_condition(lease: timedelta, at: datetime | None = None) -> Any:
    """SQL condition: a retrain run is proven alive (``running``, heartbeat within ``lease``).

    Before its first heartbeat a run counts from its start.
    """
    last_seen = func.coalesce(RetrainRun.heartbeat_at, RetrainRun.started_at)
    return and_(RetrainRun.status == "running", last_seen >= _utc(at) - lease)


def release_open(
    target: Target,
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
    with _transaction(target) as session:
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
    "PERIODIC",
    "PERIOD_ALIASES",
    "BudgetStatus",
    "Reservation",
    "budget_status",
    "create_budget",
    "delete_budget",
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
