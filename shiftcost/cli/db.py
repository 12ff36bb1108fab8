"""``shiftcost db upgrade|downgrade|current``: manage the database schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shiftcost.cli._console import command_group, make_console

if TYPE_CHECKING:
    from shiftcost.store.db import Database

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL of the database (default: SHIFTCOST_DATABASE_URL, else "
        "sqlite:///shiftcost.db). Prefer the environment variable for URLs with passwords.",
        show_default=False,
    ),
]

db_app = command_group(
    name="db",
    help="Create, migrate and inspect the shiftcost database schema.",
    no_args_is_help=True,
)


def resolve_url(database_url: str | None) -> str:
    """The URL given on the command line, else the configured one."""
    if database_url:
        return database_url
    from shiftcost.config import load_settings

    return load_settings().database_url


def open_for_cli(database_url: str | None) -> Database:
    """Open the database for a command: reachable and at the schema head, or a clear error."""
    from shiftcost.store.db import open_database

    return open_database(resolve_url(database_url))


def _engine(database_url: str | None):
    from shiftcost.store.db import Database

    database = Database(resolve_url(database_url))
    database.ping()
    return database


@db_app.command("upgrade")
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Migrate the schema up to REVISION (default: the newest). Creates every table on an empty database."""
    from shiftcost.store import migrate

    _migrate(database_url, "upgraded", lambda engine: migrate.upgrade(engine, revision), as_json)


@db_app.command("downgrade")
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: -1 for one step, base for none.")] = "-1",
    database_url: DatabaseUrlOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm; downgrading drops tables and their data.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Migrate the schema down to REVISION. This drops tables and their data: pass --yes."""
    from shiftcost.errors import InputError
    from shiftcost.store import migrate

    if not yes:
        raise InputError("Downgrading drops tables and the history in them; repeat with --yes to confirm.")
    _migrate(database_url, "downgraded", lambda engine: migrate.downgrade(engine, revision), as_json)


@db_app.command("current")
def current(
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show the database's schema revision and whether it is at this shiftcost's head."""
    from shiftcost.store import migrate
    from shiftcost.store.db import missing_sqlite_file, redact

    url = resolve_url(database_url)
    missing = missing_sqlite_file(url) is not None
    if missing:  # connecting would leave an empty file behind
        revisions: tuple[str, ...] = ()
    else:
        database = _engine(url)
        try:
            revisions = migrate.current_revisions(database.engine)
        finally:
            database.dispose()
    heads = migrate.head_revisions()
    result = {
        "database": redact(url),
        "current": list(revisions),
        "head": list(heads),
        "up_to_date": set(revisions) == set(heads),
    }
    if as_json:
        typer.echo(json.dumps(result))
        return
    state = "up to date" if result["up_to_date"] else "no database file yet: `shiftcost db upgrade` creates it" if missing else "needs `shiftcost db upgrade`"
    make_console().print(
        f"{result['database']}: revision {', '.join(revisions) or 'none'} "
        f"(head {', '.join(heads)}) - {state}",
        highlight=False,
    )


def _migrate(database_url: str | None, verb: str, move: Callable[[Any], None], as_json: bool) -> None:
    """Run ``move`` on the database's engine and report the revisions before and after."""
    from shiftcost.store import migrate
    from shiftcost.store.db import redact

    database = _engine(database_url)
    try:
        before = migrate.current_revisions(database.engine)
        move(database.engine)
        after = migrate.current_revisions(database.engine)
    finally:
        database.dispose()
    _report(verb, redact(database.url), before, after, as_json)


def _report(verb: str, url: str, before: tuple[str, ...], after: tuple[str, ...], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"database": url, "before": list(before), "after": list(after)}))
        return
    typer.echo(f"{url}: {verb} from {', '.join(before) or 'none'} to {', '.join(after) or 'none'}")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app)
