"""The ``shiftcost`` command line.

Each command lives in its own module and imports its heavy dependencies inside the
command function, so ``shiftcost --help`` stays fast and a machine without, say,
Prefect can still run ``shiftcost index``.
"""

from __future__ import annotations

import sys

import typer
from rich.text import Text

from shiftcost.cli._console import command_group, make_console
from shiftcost.errors import ShiftcostError

app = command_group(
    name="shiftcost",
    help="Predict, budget and audit what retraining under data drift costs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

err_console = make_console(stderr=True)


def _register_commands() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{module.name}").register(app)


def _whole_summaries(group: typer.Typer) -> None:
    """List every command with the whole first paragraph of its help.

    Click would cut it to the listing's width ("Assess one batch: drift, indices, predicted
    cost and the..."); a short help it is given is wrapped instead.
    """
    import inspect

    for command in group.registered_commands:
        if command.short_help is None:
            text = command.help or inspect.getdoc(command.callback) or ""
            command.short_help = " ".join(text.split("\n\n")[0].split())
    for subgroup in group.registered_groups:
        info = subgroup.typer_instance.info
        if isinstance(info.help, str) and not isinstance(info.short_help, str):
            info.short_help = info.help
        _whole_summaries(subgroup.typer_instance)


def _print_version(value: bool) -> None:
    if value:
        import shiftcost

        typer.echo(f"shiftcost {shiftcost.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    # Only carries the eager --version option; the app's help stays the Typer help above.
    return None


_register_commands()
_whole_summaries(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        app()
    except ShiftcostError as error:
        err_console.print(Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
