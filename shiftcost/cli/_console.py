"""The rich console every command prints through."""

from __future__ import annotations

import os

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
