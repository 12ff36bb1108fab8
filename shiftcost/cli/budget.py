"""``shiftcost budget create|list|update|disable|enable|delete|release-open``: energy and carbon budgets."""

from __future__ import annotations

import json
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import command_group, make_console
from shiftcost.cli.db import DatabaseUrlOption, open_for_cli

if TYPE_CHECKING:
    from shiftcost.store.models import Budget

budget_app = command_group(
    name="budget",
    help="Create, change and inspect energy/carbon budgets; release reservations of runs proven dead.",
    no_args_is_help=True,
)


class Period(str, Enum):
    per_run = "per_run"
    daily = "daily"
    monthly = "monthly"
    rolling_days = "rolling_days"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _summary(verb: str, budget: Budget) -> str:
    """One line saying what a budget now allows, e.g. ``created budget b: 2 kWh, - kg CO2e per UTC month for *``."""
    period = {
        Period.per_run.value: "per run",
        Period.daily.value: "per UTC day",
        Period.monthly.value: "per UTC month",
    }.get(budget.period) or f"per rolling {budget.rolling_days} days"
    disabled = "" if budget.disabled_at is None else " (disabled)"
    return (f"{verb} budget {budget.name}: {_number(budget.kwh_cap)} kWh, {_number(budget.co2_cap)} kg CO2e "
            f"{period} for {budget.scope}{disabled}")


@budget_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Unique budget name.")],
    period: Annotated[Period, typer.Option("--period", help="per_run, daily, monthly or rolling_days (UTC).")],
    kwh: Annotated[float | None, typer.Option("--kwh", help="Energy cap in kWh per period.")] = None,
    co2: Annotated[float | None, typer.Option("--co2", help="Carbon cap in kg CO2e per period.")] = None,
    scope: Annotated[str, typer.Option("--scope", help="A model name, or * for every model.")] = "*",
    rolling_days: Annotated[
        int | None, typer.Option("--rolling-days", help="Window length for --period rolling_days.")
    ] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a budget with a kWh cap, a kg CO2e cap, or both (caps must be finite, zero or more)."""
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        with database.session() as session:
            budget = ledger.create_budget(
                session, name, period=period.value, kwh_cap=kwh, co2_cap=co2, scope=scope,
                rolling_days=rolling_days, description=description,
            )
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps(_budget_data(budget)))
    else:
        typer.echo(_summary("created", budget))


@budget_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option("--model", help="Only budgets applying to this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Every budget with what its current period has used and has left.

    A per-run budget caps each run alone, so its figures are a new run's: nothing used, the
    whole cap left. What past runs used against it is in `shiftcost audit budget`.
    """
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        with database.session(readonly=True) as session:
            statuses = ledger.budget_status(session, model, include_disabled=True)
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps([status.as_dict() for status in statuses]))
        return
    from rich.table import Table

    # A per-run budget has no period to have used: its figures are what a new run may use
    # (`audit budget` shows what each past run used).
    table = Table(title="Budgets (current period; per-run budgets: a new run's)")
    for column in ("name", "scope", "period", "kWh cap", "kWh used", "kWh left", "kWh late", "kWh overrun", "kWh priced",
                   "CO2e cap", "CO2e used", "CO2e left", "open"):
        table.add_column(column)
    for s in statuses:
        period = f"rolling {s.rolling_days} d" if s.period == "rolling_days" else s.period
        name = f"{s.name} (disabled)" if s.disabled else s.name
        table.add_row(name, s.scope, period, _number(s.kwh_cap), _number(s.spent_kwh), _number(s.remaining_kwh),
                      _number(s.late_kwh), _number(s.overrun_kwh), _number(s.priced_kwh),
                      _number(s.co2_cap), _number(s.spent_co2), _number(s.remaining_co2), str(s.open_reservations))
    make_console().print(table)


def _budget_data(budget: Budget) -> dict:
    return {"id": budget.id, "name": budget.name, "scope": budget.scope, "period": budget.period,
            "rolling_days": budget.rolling_days, "kwh_cap": budget.kwh_cap, "co2_cap": budget.co2_cap,
            "enabled": budget.disabled_at is None}


@budget_app.command("update")
def update(
    name: Annotated[str, typer.Argument(help="The budget to change.")],
    period: Annotated[Period | None, typer.Option("--period", help="New period.")] = None,
    kwh: Annotated[float | None, typer.Option("--kwh", help="New energy cap in kWh per period.")] = None,
    co2: Annotated[float | None, typer.Option("--co2", help="New carbon cap in kg CO2e per period.")] = None,
    no_kwh: Annotated[bool, typer.Option("--no-kwh", help="Stop capping energy.")] = False,
    no_co2: Annotated[bool, typer.Option("--no-co2", help="Stop capping carbon.")] = False,
    scope: Annotated[str | None, typer.Option("--scope", help="A model name, or * for every model.")] = None,
    rolling_days: Annotated[int | None, typer.Option("--rolling-days", help="Window length for rolling_days.")] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Change a budget's caps, period or scope; what is not given stays. The ledger is kept as it is."""
    changes: dict = {}
    if period is not None:
        changes["period"] = period.value
    if kwh is not None or no_kwh:
        changes["kwh_cap"] = None if no_kwh else kwh
    if co2 is not None or no_co2:
        changes["co2_cap"] = None if no_co2 else co2
    if scope is not None:
        changes["scope"] = scope
    if rolling_days is not None:
        changes["rolling_days"] = rolling_days
    if description is not None:
        changes["description"] = description
    _change(name, changes, as_json, database_url, "updated")


@budget_app.command("disable")
def disable(
    name: Annotated[str, typer.Argument(help="The budget to disable.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Stop a budget limiting decisions; its ledger history stays and its open reservations still close."""
    _change(name, {"enabled": False}, as_json, database_url, "disabled")


@budget_app.command("enable")
def enable(
    name: Annotated[str, typer.Argument(help="The budget to enable again.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the budget as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Let a disabled budget limit decisions again."""
    _change(name, {"enabled": True}, as_json, database_url, "enabled")


def _change(name: str, changes: dict, as_json: bool, database_url: str | None, verb: str) -> None:
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        with database.session() as session:
            budget = ledger.update_budget(session, name, **changes)
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps(_budget_data(budget)))
    else:
        typer.echo(_summary(verb, budget))


@budget_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The budget to delete.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Delete a budget that was never used; one with ledger history is refused (disable it instead)."""
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        with database.session() as session:
            ledger.delete_budget(session, name)
    finally:
        database.dispose()
    typer.echo(json.dumps({"deleted": name}) if as_json else f"deleted budget {name}")


@budget_app.command("release-open")
def release_open(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only reservations older than this: 30m, 6h, 2d (0 = all).")
    ] = "1h",
    name: Annotated[
        str | None,
        typer.Option("--budget", help="Only this budget's reservations. A dead run found through them is closed "
                     "whole: its work is settled on every budget it reserved on, and all are listed."),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Recorded on each release.")
    ] = "released by `shiftcost budget release-open`: its run is dead or never started",
    lease: Annotated[
        str | None,
        typer.Option("--lease", help="A run with a heartbeat within this is alive and keeps its reservation "
                     "(default: SHIFTCOST_RETRAIN_STALE_AFTER_S)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be released or settled; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Release reservations left open by runs proven dead (no heartbeat within the lease) or never started.

    A reservation whose retrain run still renews its heartbeat is kept, however old: that
    run will settle it. A dead run whose last heartbeat priced the work it had done is
    closed as the watch closes it, its reservation settled at that price (listed under
    "settled"). Should a released run finish after all, its spend is recorded as a late
    settlement.
    """
    from shiftcost.config import load_settings
    from shiftcost.pipeline import fail_stale_retrains
    from shiftcost.pipeline.lease import Progress
    from shiftcost.store import ledger, runs
    from shiftcost.store.models import utcnow

    age = parse_age(older_than)
    lease_age = parse_age(lease) if lease is not None else timedelta(seconds=load_settings().retrain_stale_after_s)
    database = open_for_cli(database_url)
    try:
        with database.session(readonly=True) as session:
            due = ledger.release_open(session, age, reason, lease=lease_age, budget_name=name, dry_run=True)
            dead = runs.dead_runs(session, None, lease_age, utcnow(), decision_ids={r.decision_id for r in due})
            priced = {decision_id: progress for _, _, decision_id, reported in dead
                      if (progress := Progress.from_dict(reported)) is not None and progress.spent_kwh is not None}
            # Closing a dead run settles its decision on each budget, not only on --budget's.
            to_settle = [r for decision_id in sorted(priced) for r in ledger.open_reservations(session, decision_id=decision_id)]
        if dry_run:
            reservations = [r for r in due if r.decision_id not in priced]
        else:
            fail_stale_retrains(database, None, lease_age.total_seconds(), decision_ids=set(priced))
            with database.session() as session:
                reservations = ledger.release_open(session, age, reason, lease=lease_age, budget_name=name)
    finally:
        database.dispose()
    rows = [_reservation_row(r, r.kwh, r.co2) for r in reservations]
    settled = [
        _reservation_row(r, progress.spent_kwh, progress.spent_kg or 0.0, steps=progress.steps)
        for r in to_settle
        for progress in (priced[r.decision_id],)
    ]
    if as_json:
        typer.echo(json.dumps({"released": not dry_run, "reservations": rows, "settled": settled}))
        return
    typer.echo(f"{'would release' if dry_run else 'released'} {len(rows)} open reservation(s)")
    for row in rows:
        typer.echo(_reservation_line(row))
    if settled:
        typer.echo(f"{'would settle' if dry_run else 'settled'} {len(settled)} reservation(s) of dead runs at the work their last heartbeat priced")
        for row in settled:
            typer.echo(_reservation_line(row) + f", after {row['steps']} steps")


def _reservation_row(reservation: Any, kwh: float, co2: float, **extra: Any) -> dict[str, Any]:
    return {"reservation_id": reservation.id, "budget": reservation.budget, "decision_id": reservation.decision_id,
            "kwh": kwh, "co2": co2, "created_at": reservation.created_at.isoformat()} | extra


def _reservation_line(row: dict[str, Any]) -> str:
    return (f"  #{row['reservation_id']} {row['budget']}: {row['kwh']:.6g} kWh, {row['co2']:.6g} kg CO2e "
            f"(decision {row['decision_id']}, reserved {row['created_at']})")


def parse_age(text: str):
    """``30m``, ``6h``, ``2d`` or ``0`` as a timedelta."""
    import re

    from shiftcost.errors import InputError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or (match.group(2) == "" and float(match.group(1)) != 0):
        raise InputError(f"Cannot read the age {text!r}; use a number with a unit such as 30m, 6h or 2d, or 0.")
    amount = float(match.group(1))
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "": "seconds"}[match.group(2)]
    try:
        age = timedelta(**{unit: amount})
    except OverflowError:
        age = timedelta.max
    if age > _LONGEST_AGE:
        raise InputError(f"The age {text!r} reaches back more than {_LONGEST_AGE.days} days; give a shorter one.")
    return age


# As far back as a rolling budget may reach (ledger.MAX_ROLLING_DAYS).
_LONGEST_AGE = timedelta(days=36_600)


def register(app: typer.Typer) -> None:
    app.add_typer(budget_app)
