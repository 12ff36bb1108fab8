"""The rich consoles every command prints through."""

from __future__ import annotations

from rich.console import Console

# Rich gives a file or a pipe 80 columns, where a table of ten columns folds each cell into
# slivers a few letters wide; a log or a cron mail has the room for an audit table's natural width.
PIPE_WIDTH = 240


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that is ``PIPE_WIDTH`` wide when not on a terminal.

    A wider ``COLUMNS`` from the environment is kept.
    """
    console = Console(stderr=stderr)
    if not console.is_terminal and console.width < PIPE_WIDTH:
        console.width = PIPE_WIDTH
    return console
