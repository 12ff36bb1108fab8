"""What a budget's period has used and has left: periods, the accounting rule in SQL, statuses.

The rule itself is stated in ``shiftcost.store.ledger``; :func:`usage_columns` is its one
SQL form, used here for ``remaining`` and by the audit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from shiftcost.errors import ConfigError
from shiftcost.statuses import BudgetPeriod, LedgerKind
from shiftcost.store.ledger_budgets import (
    _EARLIEST,
    PERIODIC,
    _budget,
    _require_session,
    _utc,
    fits,
    list_budgets,
    normalise_period,
)
from shiftcost.store.models import BUDGET_PERIODS, Budget, LedgerEntry


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
    priced_kwh: float = 0.0
    """Part of ``settled_kwh`` that dead runs' last heartbeats priced: work no meter read."""
    priced_co2: float = 0.0
    disabled: bool = False

    @classmethod
    def planned(
        cls,
        name: str,
        scope: str = "*",
        period: str = BudgetPeriod.PER_RUN,
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
        return self.window_end if self.period in (BudgetPeriod.DAILY, BudgetPeriod.MONTHLY) else None

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


# --- periods and what they have used ----------------------------------------------------------


def period_window(budget: Budget, at: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    """The ``[start, end)`` window of the budget's period containing ``at`` (UTC).

    ``per_run`` budgets have no window (each decision stands alone): ``(None, None)``.
    """
    at = _utc(at)
    if budget.period == BudgetPeriod.PER_RUN:
        return None, None
    if budget.period == BudgetPeriod.DAILY:
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if budget.period == BudgetPeriod.MONTHLY:
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
    if period == BudgetPeriod.MONTHLY:
        return (at.year, at.month)
    if period == BudgetPeriod.DAILY:
        return at.date()
    return None


def entry_effect(kind: str, amount: float, closed_amount: float | None) -> float:
    """How one ledger entry changes what its reservation's period has used.

    ``closed_amount`` is the amount of the entry it closes (None for a reservation). A
    reservation adds what it holds; a release gives it back; a settlement replaces it by
    the measure. A late settlement closes a release (which holds nothing), so it adds its
    whole measure; a measure closing a dead run's priced settlement replaces that price.
    """
    if kind == LedgerKind.RESERVE:
        return amount
    if kind == LedgerKind.RELEASE:
        return -(closed_amount or 0.0)
    return amount - (closed_amount or 0.0)


def usage_columns(r: Any, c: Any, late: Any) -> dict[str, Any]:
    """Per-reservation SQL expressions of the accounting rule (one place; the audit uses them).

    ``r`` is the reservation, ``c`` the entry closing it (settle or release) and ``late`` a
    settlement closing that one, each outer-joined (NULL when absent): a late settlement of
    a release, or the measure that replaced a dead run's priced settlement. The last entry
    of the chain is what the reservation used::

        measured = CASE WHEN late.id IS NOT NULL THEN late.energy_kwh
                        WHEN c.kind = 'settle' THEN c.energy_kwh ELSE 0 END
        held     = CASE WHEN c.id IS NULL THEN r.energy_kwh ELSE 0 END      -- still open
        late     = CASE WHEN c.kind = 'release' AND late.id IS NOT NULL THEN late.energy_kwh ELSE 0 END
        overrun  = CASE WHEN measured > r.energy_kwh THEN measured - r.energy_kwh ELSE 0 END
        priced   = measured WHEN the chain's last entry is priced (a dead run's work, not measured), ELSE 0

    ``measured`` counts every settlement, priced ones included: ``priced`` says how much of
    it no meter read.
    """
    columns: dict[str, Any] = {}
    for measure, column in (("kwh", "energy_kwh"), ("co2", "emissions_kg")):
        reserved = getattr(r, column)
        measured = case((late.id.is_not(None), getattr(late, column)), (c.kind == LedgerKind.SETTLE, getattr(c, column)), else_=0.0)
        columns[f"settled_{measure}"] = measured
        columns[f"reserved_{measure}"] = case((c.id.is_(None), reserved), else_=0.0)
        columns[f"late_{measure}"] = case((and_(c.kind == LedgerKind.RELEASE, late.id.is_not(None)), getattr(late, column)), else_=0.0)
        columns[f"overrun_{measure}"] = case((measured > reserved, measured - reserved), else_=0.0)
        columns[f"priced_{measure}"] = case(
            (late.id.is_not(None), case((late.priced, getattr(late, column)), else_=0.0)),
            (and_(c.kind == LedgerKind.SETTLE, c.priced), getattr(c, column)),
            else_=0.0,
        )
    columns["open"] = case((c.id.is_(None), 1), else_=0)
    columns["released"] = case((c.kind == LedgerKind.RELEASE, 1), else_=0)
    return columns


def usage_joins(query: Any) -> tuple[Any, Any, Any, Any]:
    """``query`` selecting from reservations ``r`` joined to their closing entry ``c`` and late settlement."""
    r = aliased(LedgerEntry, name="r")
    c = aliased(LedgerEntry, name="c")
    late = aliased(LedgerEntry, name="late")
    joined = (
        query.select_from(r)
        .outerjoin(c, c.reservation_id == r.id)
        .outerjoin(late, and_(late.reservation_id == c.id, late.kind == LedgerKind.SETTLE))
        .where(r.kind == LedgerKind.RESERVE)
    )
    return joined, r, c, late


_USAGE = ("settled_kwh", "settled_co2", "reserved_kwh", "reserved_co2", "open",
          "late_kwh", "late_co2", "overrun_kwh", "overrun_co2", "priced_kwh", "priced_co2")


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
    if budget.period == BudgetPeriod.PER_RUN and decision_id is None:
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
    session: Session, budget_name: str, at: datetime | None = None, *, decision_id: int | None = None
) -> BudgetStatus:
    """What the budget's period containing ``at`` (default now) has used and has left.

    For a ``per_run`` budget the figures are those of ``decision_id`` (nothing used when
    None, i.e. the whole cap is available to a new run).
    """
    _require_session(session)
    return _status(session, _budget(session, budget_name), _utc(at), decision_id)


def budget_status(
    session: Session, model_name: str | None = None, at: datetime | None = None, *, include_disabled: bool = False
) -> list[BudgetStatus]:
    """The status of every enabled budget applying to ``model_name`` (all budgets when None)."""
    at = _utc(at)
    _require_session(session)
    budgets = list_budgets(session, model_name, include_disabled=include_disabled)
    return [_status(session, budget, at) for budget in budgets]
