"""The rich console every command prints through."""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.console import Console

# Rich gives a file or a pipe 80 columns, where a table of ten columns folds each cell into
# slivers a few letters wide; a log or a cron mail has room for an audit table's natural width.
PIPE_WIDTH = 240


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr), ``PIPE_WIDTH`` wide when not on a terminal unless
    ``COLUMNS`` in the environment says otherwise.

    Markup is off: error messages, file and batch names and table cells carry text such as
    ``[recipe]`` or ``batch[2].npz`` that rich would otherwise swallow as a style tag. Colour
    is given with ``style=`` instead.
    """
    console = Console(stderr=stderr, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def command_group(**options: Any) -> typer.Typer:
    """A Typer app whose ``--help`` is Click's plain text.

    Typer's rich help cut long option names to fit 80 columns (a pipe, or a common terminal):
    ``retrain --help`` showed ``--reference-st…`` and ``--probe-max-sh…``, the very names a reader
    came for. Plain help wraps the descriptions and keeps every name whole, and a usage error is
    one ``Error:`` line instead of a box.
    """
    return typer.Typer(rich_markup_mode=None, **options)
