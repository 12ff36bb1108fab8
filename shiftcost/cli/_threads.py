"""The ``--threads`` option of the commands that train on the CPU, and running a command at it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., Any])


def threads_option(help_text: str) -> Any:
    """A ``--threads N`` option (at least 1; None when not given) with this help."""
    return Annotated[int | None, typer.Option("--threads", min=1, show_default=False, help=help_text)]


ThreadsOption = threads_option(
    "Torch CPU threads (default: torch's). A calibration's energy rate holds at the count it trained at: give that count where it differs."
)


def at_torch_threads(command: Command) -> Command:
    """``command`` run at its ``threads`` argument's torch CPU threads (``None``: torch's), restored after."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from shiftcost.data.demo import torch_threads

        with torch_threads(kwargs.get("threads")):
            return command(*args, **kwargs)

    return run  # type: ignore[return-value]
