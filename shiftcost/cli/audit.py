"""``shiftcost audit cost|errors|decisions|budget|calibrations``: answer for past decisions."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import command_group, make_console
from shiftcost.cli.db import DatabaseUrlOption, open_for_cli

if TYPE_CHECKING:
    from shiftcost.store.audit import AuditResult

audit_app = command_group(
    name="audit",
    help="Audit history: retrain cost, prediction error, decisions, budget burn, calibrations.",
    no_args_is_help=True,
)


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([hdw])$")


def parse_time(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """An ISO date/datetime (naive = UTC) or a span back from now: ``12h``, ``90d``, ``4w``."""
    if text is None:
        return None
    from shiftcost.errors import InputError

    out_of_range = InputError(
        f"The time {text!r} is out of range; give a date after 0001-01-02 and before 9999-12-31, "
        "or a shorter span back from now."
    )
    match = _RELATIVE.match(text.strip())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        try:
            span = {"h": timedelta(hours=amount), "d": timedelta(days=amount), "w": timedelta(weeks=amount)}[unit]
            return (now or datetime.now(UTC)) - span
        except OverflowError:
            raise out_of_range from None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise InputError(
            f"Cannot read the time {text!r}; use an ISO date such as 2025-01-31, a datetime such "
            "as 2025-01-31T12:00, or a span back from now such as 90d."
        ) from error
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise out_of_range from None


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):  # a decision's reasons by their codes; --format json has them whole
        return ", ".join(item["code"] if isinstance(item, dict) and "code" in item else _cell(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def emit(result: AuditResult, output: OutputFormat, title: str) -> None:
    """Print an audit result as a rich table, CSV (all columns) or JSON (rows and totals)."""
    if output is OutputFormat.json:
        payload = {
            "query": result.name,
            "rows": [{k: _plain(v) for k, v in row.items()} for row in result.rows],
            "totals": result.totals,
        }
        typer.echo(json.dumps(payload, default=str))
        return
    if output is OutputFormat.csv:
        buffer = io.StringIO()
        fields = list(result.rows[0]) if result.rows else result.columns
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else _plain(v)) for k, v in row.items()})
        typer.echo(buffer.getvalue(), nl=False)
        return
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(*(_cell(row.get(column)) for column in result.columns))
    console = make_console()
    console.print(table)
    console.print(
        "totals: " + ", ".join(f"{k}={_cell(v) if not isinstance(v, dict) else v}" for k, v in result.totals.items()),
        highlight=False,
    )


ModelOption = Annotated[str | None, typer.Option("--model", help="Only this model name (all its versions).")]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="From this UTC time (ISO date/datetime, or 90d, 12h, 4w ago).")
]
UntilOption = Annotated[str | None, typer.Option("--until", help="Before this UTC time (same forms as --since).")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="Output format.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
ShowSqlOption = Annotated[
    bool, typer.Option("--show-sql", help="Also print the SQL statements the query ran (to stderr).")
]
LimitOption = Annotated[
    int, typer.Option("--limit", min=0, help="Show the newest N rows (0: all); totals always cover all.")
]


def _run(name: str, title: str, database_url: str | None, output: OutputFormat, as_json: bool,
         show_sql: bool = False, **filters: Any) -> None:
    from shiftcost.store import audit

    filters["since"], filters["until"] = time_window(filters.get("since"), filters.get("until"))
    if filters.get("limit") == 0:
        filters["limit"] = None
    database = open_for_cli(database_url)
    try:
        with database.session(readonly=True) as session:
            if name != "budget":  # a budget's scope may name a model not registered yet
                require_known_model(session, filters.get("model"))
            result = audit.run(session, name, **filters)
    finally:
        database.dispose()
    emit(result, OutputFormat.json if as_json else output, title)
    if show_sql:
        for statement, parameters in zip(result.sql, result.parameters, strict=True):
            typer.echo(f"{statement};", err=True)
            if parameters:
                typer.echo("-- bound, in order: " + ", ".join(f"{name} = {_shown(value)}" for name, value in parameters), err=True)


def time_window(since: str | None, until: str | None) -> tuple[Any, Any]:
    """--since and --until as UTC times; refused when no row could fall between them."""
    start, end = parse_time(since), parse_time(until)
    if start is not None and end is not None and start >= end:
        from shiftcost.errors import InputError

        raise InputError(f"--since ({start:%Y-%m-%d %H:%M} UTC) is not before --until ({end:%Y-%m-%d %H:%M} UTC), "
                         "so no row could match; give the earlier time to --since.")
    return start, end


def require_known_model(session: Any, model: str | None) -> None:
    """Refuse a --model that names no model: a typo would otherwise read as a model that never retrained."""
    from shiftcost.errors import InputError
    from shiftcost.store import repository

    if model is not None and not repository.model_versions(session, model):
        raise InputError(f"No model is named {model!r}; `shiftcost model list` shows the names.")


def _shown(value: Any) -> str:
    """A bound value as SQL would spell it: text and times quoted."""
    from datetime import datetime
    from enum import Enum

    if isinstance(value, datetime):
        return f"'{value.isoformat(sep=' ')}'"
    return repr(value.value if isinstance(value, Enum) else value)


def _listing(name: str, title: str, doc: str) -> Any:
    """A command listing the audit query ``name`` with the common filters and a row limit."""

    def command(
        model: ModelOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        limit: LimitOption = 1000,
        output: FormatOption = OutputFormat.table,
        as_json: JsonOption = False,
        show_sql: ShowSqlOption = False,
        database_url: DatabaseUrlOption = None,
    ) -> None:
        _run(name, title, database_url, output, as_json, show_sql, model=model, since=since, until=until, limit=limit)

    command.__name__ = command.__qualname__ = name
    command.__doc__ = doc
    return command


cost = audit_app.command("cost")(
    _listing("cost", "Retrain cost", "Actual kWh, kg CO2e and epochs of every retrain run, with totals.")
)
errors = audit_app.command("errors")(
    _listing(
        "errors", "Prediction error",
        "Predicted vs actual cost of each retrain, interval hit or miss, MdAPE and coverage; runs stopped before "
        "the cutoff (cap or budget guard) are marked, their actual cost a lower bound.",
    )
)


@audit_app.command("decisions")
def decisions(
    model: ModelOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    skipped_for_budget: Annotated[
        bool, typer.Option("--skipped-for-budget", help="Only batches not retrained because of a budget.")
    ] = False,
    action: Annotated[str | None, typer.Option("--action", help="Only retrain, skip or defer.")] = None,
    limit: LimitOption = 1000,
    output: FormatOption = OutputFormat.table,
    as_json: JsonOption = False,
    show_sql: ShowSqlOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Every decision with its reasons, newest first; totals count all matching decisions."""
    _run("decisions", "Decisions", database_url, output, as_json, show_sql,
         model=model, since=since, until=until, skipped_for_budget=skipped_for_budget, action=action, limit=limit)


@audit_app.command("budget")
def budget(
    model: ModelOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    name: Annotated[str | None, typer.Option("--budget", help="Only this budget.")] = None,
    output: FormatOption = OutputFormat.table,
    as_json: JsonOption = False,
    show_sql: ShowSqlOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Reserved, settled and remaining kWh / kg CO2e per budget and period."""
    _run("budget", "Budget burn", database_url, output, as_json, show_sql,
         model=model, since=since, until=until, budget=name)


@audit_app.command("calibrations")
def calibrations(
    model: ModelOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    output: FormatOption = OutputFormat.table,
    as_json: JsonOption = False,
    show_sql: ShowSqlOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Every cost-model version with its source, data points and leave-one-out error."""
    _run("calibrations", "Cost-model versions", database_url, output, as_json, show_sql,
         model=model, since=since, until=until)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app)
