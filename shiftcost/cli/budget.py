"""``shiftcost budget create|list|release-open``: energy and carbon budgets."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from shiftcost.cli.db import DatabaseUrlOption, open_for_cli

budget_app = typer.Typer(
    name="budget",
    help="Create and inspect energy/carbon budgets; release reservations left open by crashed runs.",
    no_args_is_help=True,
)


class Period(str, Enum):
    per_run = "per_run"
    daily = "daily"
    monthly = "monthly"
    rolling_days = "rolling_days"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


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
    """Create a budget with a kWh cap, a kg CO2e cap, or both (caps must be zero or more)."""
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        budget = ledger.create_budget(
            database, name, period=period.value, kwh_cap=kwh, co2_cap=co2, scope=scope,
            rolling_days=rolling_days, description=description,
        )
    finally:
        database.dispose()
    data = {"id": budget.id, "name": budget.name, "scope": budget.scope, "period": budget.period,
            "rolling_days": budget.rolling_days, "kwh_cap": budget.kwh_cap, "co2_cap": budget.co2_cap}
    if as_json:
        typer.echo(json.dumps(data))
    else:
        typer.echo(f"created budget {budget.name}: {_number(budget.kwh_cap)} kWh, "
                   f"{_number(budget.co2_cap)} kg CO2e per {budget.period} for {budget.scope}")


@budget_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option("--model", help="Only budgets applying to this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Every budget with what its current period has used and has left."""
    from shiftcost.store import ledger

    database = open_for_cli(database_url)
    try:
        with database.session(readonly=True) as session:
            statuses = ledger.budget_status(session, model)
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps([status.as_dict() for status in statuses]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Budgets (current period)")
    for column in ("name", "scope", "period", "kWh cap", "kWh used", "kWh left",
                   "CO2e cap", "CO2e used", "CO2e left", "open"):
        table.add_column(column)
    for s in statuses:
        period = f"rolling {s.rolling_days} d" if s.period == "rolling_days" else s.period
        table.add_row(s.name, s.scope, period, _number(s.kwh_cap), _number(s.spent_kwh), _number(s.remaining_kwh),
                      _number(s.co2_cap), _number(s.spent_co2), _number(s.remaining_co2), str(s.open_reservations))
    Console().print(table)


@budget_app.command("release-open")
def release_open(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Only reservations older than this: 30m, 6h, 2d (0 = all).")
    ] = "1h",
    name: Annotated[str | None, typer.Option("--budget", help="Only this budget.")] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Recorded on each release.")
    ] = "released by `shiftcost budget release-open`: run did not settle",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be released; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Release reservations left open (a run crashed between reserve and settle)."""
    from shiftcost.store import ledger

    age = parse_age(older_than)
    database = open_for_cli(database_url)
    try:
        if dry_run:
            reservations = ledger.open_reservations(database, age, budget_name=name)
        else:
            reservations = ledger.release_open(database, age, reason, budget_name=name)
    finally:
        database.dispose()
    rows = [{"reservation_id": r.id, "budget": r.budget, "decision_id": r.decision_id, "kwh": r.kwh,
             "co2": r.co2, "created_at": r.created_at.isoformat()} for r in reservations]
    if as_json:
        typer.echo(json.dumps({"released": not dry_run, "reservations": rows}))
        return
    verb = "would release" if dry_run else "released"
    typer.echo(f"{verb} {len(rows)} open reservation(s)")
    for row in rows:
        typer.echo(f"  #{row['reservation_id']} {row['budget']}: {row['kwh']:.6g} kWh, {row['co2']:.6g} kg CO2e "
                   f"(decision {row['decision_id']}, reserved {row['created_at']})")


def parse_age(text: str):
    """``30m``, ``6h``, ``2d`` or ``0`` as a timedelta."""
    import re
    from datetime import timedelta

    from shiftcost.errors import InputError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or (match.group(2) == "" and float(match.group(1)) != 0):
        raise InputError(f"Cannot read the age {text!r}; use a number with a unit such as 30m, 6h or 2d, or 0.")
    amount = float(match.group(1))
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "": "seconds"}[match.group(2)]
    return timedelta(**{unit: amount})


def register(app: typer.Typer) -> None:
    app.add_typer(budget_app)
