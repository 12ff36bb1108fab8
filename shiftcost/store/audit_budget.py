"""The budget-burn audit: reserved, settled and remaining kWh / kg CO2e per budget and period.

It applies the ledger's accounting rule (``ledger.usage_columns``) per reservation and
sums it per budget and UTC day in SQL; months and rolling windows are summed in Python.
"""

from __future__ import annotations

from collections import defaultdict, deque
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from shiftcost.store.audit_common import AuditResult, _float, _Runner, _window, utc_day
from shiftcost.store.models import Budget


def _burn_query(budget_ids: list[int], since: datetime | None, until: datetime | None,
                *, per_run: bool) -> Select:
    """Per budget and UTC day: reservations, settled (late and overrun apart), open, released.

    The ledger's accounting rule per reservation (``ledger.usage_columns``), summed:

    SELECT r.budget_id, <UTC day of r.created_at> AS day, count(r.id) AS reservations,
           sum(measured) AS settled_kwh, sum(held) AS reserved_kwh, sum(late) AS late_kwh,
           sum(overrun) AS overrun_kwh, (same for emissions_kg), sum(open), sum(released)
    FROM budget_ledger r LEFT JOIN budget_ledger c ON c.reservation_id = r.id
         LEFT JOIN budget_ledger late ON late.reservation_id = c.id AND late.kind = 'settle'
    WHERE r.kind = 'reserve' AND r.budget_id IN (:ids)
      AND r.created_at >= :since AND r.created_at < :until
    GROUP BY r.budget_id, day

    For per-run budgets the same statement is grouped by (budget, day, decision) first and
    re-aggregated per day, adding ``max(settled + reserved)`` as the costliest run of the
    day. Months and rolling windows are summed from the days in Python.
    """
    from shiftcost.store import ledger

    base, r, c, late = ledger.usage_joins(select())
    usage = ledger.usage_columns(r, c, late)
    day = utc_day(r.created_at).label("day")
    sums = [func.count(r.id).label("reservations")] + [func.sum(usage[key]).label(key) for key in _BURN_SUMS]
    keys = [r.budget_id, day, r.decision_id] if per_run else [r.budget_id, day]
    extra = [(func.sum(usage["settled_kwh"]) + func.sum(usage["reserved_kwh"])).label("spent_kwh"),
             (func.sum(usage["settled_co2"]) + func.sum(usage["reserved_co2"])).label("spent_co2")] if per_run else []
    grouped = _window(
        base.add_columns(*keys, *sums, *extra).where(r.budget_id.in_(budget_ids)),
        r.created_at, since, until,
    ).group_by(*keys)
    if not per_run:
        return grouped
    p = grouped.subquery("per_run").c
    return select(
        p.budget_id, p.day,
        *(func.sum(p[column.name]).label(column.name) for column in sums),
        func.max(p.spent_kwh).label("max_run_kwh"), func.max(p.spent_co2).label("max_run_co2"),
    ).group_by(p.budget_id, p.day)


# What each reservation used, as ``ledger.usage_columns`` names it.
_MEASURES = ("settled_kwh", "settled_co2", "reserved_kwh", "reserved_co2", "late_kwh", "late_co2",
             "overrun_kwh", "overrun_co2", "priced_kwh", "priced_co2")
_BURN_SUMS = (*_MEASURES, "open", "released")


def _spend_once_query(budget_ids: list[int], since: datetime | None, until: datetime | None) -> Select:
    """What the decisions behind these budgets' reservations spent, each decision counted once.

    A decision reserves (and settles) the same amounts on every budget that applies to it,
    so summing over budgets would count one run's spend once per budget. A decision may
    also hold several reservations on one budget (a probe's spend beside its retrain's),
    which add up. So per decision and budget the reservations are summed, per decision the
    largest of those budget sums is taken, and the decisions are summed:

    SELECT sum(settled_kwh), ... FROM (SELECT decision_id, max(settled_kwh) AS settled_kwh, ...
        FROM (SELECT r.decision_id, r.budget_id, sum(measured) AS settled_kwh, sum(held) AS reserved_kwh,
                     sum(late), sum(overrun), ... GROUP BY r.decision_id, r.budget_id)
        GROUP BY decision_id)
    """
    from shiftcost.store import ledger

    base, r, c, late = ledger.usage_joins(select())
    usage = ledger.usage_columns(r, c, late)
    per_budget = _window(
        base.add_columns(r.decision_id, *(func.sum(usage[key]).label(key) for key in _MEASURES))
        .where(r.budget_id.in_(budget_ids)),
        r.created_at, since, until,
    ).group_by(r.decision_id, r.budget_id).subquery("per_budget")
    per_decision = select(*(func.max(per_budget.c[key]).label(key) for key in _MEASURES)).group_by(
        per_budget.c.decision_id
    ).subquery("per_decision")
    return select(*(func.coalesce(func.sum(per_decision.c[key]), 0.0).label(key) for key in _MEASURES))


def budget_burn(
    session: Session,
    *,
    model: str | None = None,
    budget: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> AuditResult:
    """Reserved, settled and remaining kWh / kg CO2e per budget and period.

    One row per period with ledger activity: calendar day (daily), calendar month
    (monthly), day (rolling: ``remaining`` is for the N-day window ending at that day's
    end), day (per_run: ``remaining`` is the headroom of that day's costliest run, i.e.
    cap minus its spend). ``model`` keeps budgets whose scope is that model or ``*``.
    SQL: ``_burn_query``; the budgets come from
    ``SELECT * FROM budgets WHERE scope IN (:model, '*') AND name = :budget ORDER BY name``.
    """
    budget_query = select(Budget).order_by(Budget.name)
    if model is not None:
        budget_query = budget_query.where(Budget.scope.in_([model, "*"]))
    if budget is not None:
        budget_query = budget_query.where(Budget.name == budget)
    budgets = list(session.scalars(budget_query))
    runner = _Runner(session)
    runner.record(budget_query)
    rows: list[dict[str, Any]] = []
    if budgets:
        longest = max(b.rolling_days or 0 for b in budgets)
        # Rolling windows reaching back before `since` need the days before it too.
        query_since = since - timedelta(days=longest) if since is not None else None
        by_budget: dict[int, dict[date, dict[str, Any]]] = defaultdict(dict)
        for per_run in (False, True):
            ids = [b.id for b in budgets if (b.period == "per_run") == per_run]
            if ids:
                for row in runner.rows(_burn_query(ids, query_since, until, per_run=per_run)):
                    by_budget[row["budget_id"]][date.fromisoformat(row["day"])] = row
        for b in budgets:
            rows.extend(_period_rows(b, by_budget.get(b.id, {}), since))
    # Totals count each decision's spend once, however many budgets it was reserved on.
    spend = runner.rows(_spend_once_query([b.id for b in budgets], since, until))[0] if budgets else {}
    totals = {
        "budgets": len(budgets),
        **{key: _float(spend.get(key)) for key in _MEASURES},
    }
    columns = ["budget", "period", "period_start", "period_end", "reservations", "open", "released",
               "reserved_kwh", "settled_kwh", "priced_kwh", "late_kwh", "overrun_kwh", "remaining_kwh",
               "reserved_co2", "settled_co2", "priced_co2", "late_co2", "overrun_co2", "remaining_co2"]
    return AuditResult("budget", columns, rows, totals, runner.sql, runner.parameters)


def _period_rows(b: Budget, days: dict[date, dict[str, Any]], since: datetime | None) -> list[dict[str, Any]]:
    def midnight(day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=UTC)

    shown = [d for d in sorted(days) if since is None or midnight(d) + timedelta(days=1) > since]
    if b.period == "monthly":
        months: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for day in shown:
            months[(day.year, day.month)].append(days[day])
        out = []
        for year, month in sorted(months):
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            out.append(_burn_row(b, f"{year:04d}-{month:02d}", start, end, months[(year, month)]))
        return out
    if b.period == "rolling_days":
        assert b.rolling_days is not None
        out, window, spent = [], deque(), [0.0, 0.0]
        for day in sorted(days):  # a sliding sum over the N days ending with `day`
            window.append(day)
            spent[0] += _spent(days[day], "kwh")
            spent[1] += _spent(days[day], "co2")
            while (day - window[0]).days >= b.rolling_days:
                gone = days[window.popleft()]
                spent[0] -= _spent(gone, "kwh")
                spent[1] -= _spent(gone, "co2")
            if day not in shown:
                continue
            end = midnight(day) + timedelta(days=1)
            row = _burn_row(b, day.isoformat(), end - timedelta(days=b.rolling_days), end, [days[day]])
            row["remaining_kwh"] = None if b.kwh_cap is None else b.kwh_cap - spent[0]
            row["remaining_co2"] = None if b.co2_cap is None else b.co2_cap - spent[1]
            out.append(row)
        return out
    out = []
    for day in shown:
        row = _burn_row(b, day.isoformat(), midnight(day), midnight(day) + timedelta(days=1), [days[day]])
        if b.period == "per_run":
            row["remaining_kwh"] = None if b.kwh_cap is None else b.kwh_cap - _float(days[day]["max_run_kwh"])
            row["remaining_co2"] = None if b.co2_cap is None else b.co2_cap - _float(days[day]["max_run_co2"])
        out.append(row)
    return out


def _spent(part: dict[str, Any], measure: str) -> float:
    return _float(part[f"settled_{measure}"]) + _float(part[f"reserved_{measure}"])


def _burn_row(b: Budget, period: str, start: datetime | None, end: datetime | None,
              parts: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> float:
        return sum(_float(part[key]) for part in parts)

    settled_kwh, reserved_kwh = total("settled_kwh"), total("reserved_kwh")
    settled_co2, reserved_co2 = total("settled_co2"), total("reserved_co2")
    return {
        "budget": b.name,
        "budget_period": b.period,
        "period": period,
        "period_start": start,
        "period_end": end,
        "reservations": int(total("reservations")),
        "open": int(total("open")),
        "released": int(total("released")),
        "reserved_kwh": reserved_kwh,
        "settled_kwh": settled_kwh,
        "priced_kwh": total("priced_kwh"),
        "late_kwh": total("late_kwh"),
        "overrun_kwh": total("overrun_kwh"),
        "remaining_kwh": None if b.kwh_cap is None else b.kwh_cap - settled_kwh - reserved_kwh,
        "reserved_co2": reserved_co2,
        "settled_co2": settled_co2,
        "priced_co2": total("priced_co2"),
        "late_co2": total("late_co2"),
        "overrun_co2": total("overrun_co2"),
        "remaining_co2": None if b.co2_cap is None else b.co2_cap - settled_co2 - reserved_co2,
        "kwh_cap": b.kwh_cap,
        "co2_cap": b.co2_cap,
    }
