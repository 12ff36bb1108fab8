"""``shiftcost report``: one self-contained HTML report of any shiftcost database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from shiftcost.cli._console import make_console
from shiftcost.cli.audit import ModelOption, SinceOption, UntilOption, require_known_model, time_window
from shiftcost.cli.db import DatabaseUrlOption, open_for_cli


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.", dir_okay=False)] = Path("shiftcost-report.html"),
    model: ModelOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Show the newest N batches and decisions (0: all); totals cover all.")
    ] = 1000,
    title: Annotated[str, typer.Option("--title", help="Heading of the report.")] = "shiftcost report",
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Write an HTML report (plots embedded) of indices, predicted vs actual energy, budgets and decisions."""
    from shiftcost.report import write_report

    start, end = time_window(since, until)
    database = open_for_cli(database_url)
    try:
        with database.session(readonly=True) as session:
            require_known_model(session, model)
        summary = write_report(database, out, model=model, since=start, until=end, limit=limit or None, title=title)
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
        return

    make_console().print(
        f"Wrote {summary.path} ({summary.bytes / 1024:.0f} KiB): {summary.batches} batches, "
        f"{summary.decisions} decisions, {summary.retrain_runs} retrain runs, plots: {', '.join(summary.plots)}.",
        highlight=False,
    )
