"""Every command's ``--help`` at 80 columns, a pipe's or a common terminal's width."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from shiftcost.cli import app


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group below ``group`` (Typer's own Click, so groups are told by their commands)."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))


def help_text(*path: str) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def words(text: str) -> str:
    """The text with its line breaks undone (a wrap may also break after a hyphen)."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def test_every_option_is_named_whole_and_every_command_listed_with_its_whole_summary() -> None:
    listed = list(commands(typer.main.get_command(app)))
    assert len(listed) > 30
    for path, command in listed:
        text = help_text(*path)
        options = {opt for param in command.params for opt in param.opts if opt.startswith("--")}
        for option in options:
            # Listed whole where its entry starts, not only quoted in some description.
            assert re.search(rf"^ +(-\w, )?{re.escape(option)}(?=[\s,/]|$)", text, re.MULTILINE), (path, option, text)
        parent = help_text(*path[:-1])
        summary = words((command.short_help or command.help or "").split("\n\n")[0])
        assert summary and summary in words(parent), (path, summary)
