"""Budgets of the ledger: their definitions, validated, and the transactions every ledger call runs in.

A budget is validated on the way in (periods and amounts the dates and the database can
hold); a disabled budget no longer limits decisions but keeps its ledger; a budget with
ledger history cannot be deleted, only disabled. Every function takes a ``Session`` and
runs in its transaction (the caller commits). The accounting rule is in ``shiftcost.store.ledger``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc, func, select
from sqlalchemy.orm import Session

from shiftcost.errors import InputError
from shiftcost.statuses import BudgetPeriod
from shiftcost.store.errors import BudgetError, NotFoundError
from shiftcost.store.models import BUDGET_PERIODS, Budget, LedgerEntry, utcnow

# Float sums of many entries drift by a few ulps; never refuse a reservation for that.
_SLACK = 1e-9

PERIOD_ALIASES = {"per-run": BudgetPeriod.PER_RUN, "rolling": BudgetPeriod.ROLLING_DAYS, "rolling-days": BudgetPeriod.ROLLING_DAYS}
#: Budget periods whose cap renews, so waiting can make room.
PERIODIC = frozenset({BudgetPeriod.DAILY, BudgetPeriod.MONTHLY, BudgetPeriod.ROLLING_DAYS})
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


def _require_session(session: Session) -> None:
    """Refuse anything but a Session: the caller owns the transaction, so it decides what commits together."""
    if not isinstance(session, Session):
        raise TypeError(
            f"The ledger takes a sqlalchemy Session (got {type(session).__name__}); "
            "open one with `with db.session() as session:` and pass it."
        )


def _amount(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"The {what} must be a finite non-negative number, got {value}.")
    return value


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return utcnow()
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


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
            raise BudgetError(f"Budget {name!r} has a {what} cap of {cap}; caps must be finite numbers, zero or more.")
    if period == BudgetPeriod.ROLLING_DAYS:
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
    session: Session,
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
    _require_session(session)
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
    session: Session,
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
    _require_session(session)
    budget = _budget(session, name, lock=True)
    new_period = normalise_period(period) if period is not None else budget.period
    if rolling_days is _UNCHANGED:
        rolling_days = budget.rolling_days if new_period == BudgetPeriod.ROLLING_DAYS else None
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


def delete_budget(session: Session, name: str) -> None:
    """Delete a budget that has never been used; one with ledger entries is refused.

    The ledger is the history the audit answers from, so it is never deleted: a used
    budget is disabled instead (``update_budget(..., enabled=False)``).
    """
    _require_session(session)
    budget = _budget(session, name, lock=True)
    used = session.scalar(select(func.count(LedgerEntry.id)).where(LedgerEntry.budget_id == budget.id))
    if used:
        raise BudgetError(
            f"Budget {name!r} has {used} ledger entries, which are kept as history; "
            f"disable it instead with `shiftcost budget disable {name}`."
        )
    session.delete(budget)
    session.flush()


def get_budget(session: Session, name: str) -> Budget:
    """A budget by name, or ``NotFoundError``."""
    _require_session(session)
    return _budget(session, name)


def list_budgets(session: Session, model_name: str | None = None, *, include_disabled: bool = True) -> list[Budget]:
    """Every budget, or those applying to ``model_name`` (its own scope or ``*``), by name."""
    _require_session(session)
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
