"""Errors a user can cause and fix.

Every message is one sentence that names the input at fault and what to do about it.
The CLI prints the message alone (no traceback) and exits non-zero; library callers
catch ``ShiftcostError`` to tell user errors from bugs.
"""

import re


class ShiftcostError(Exception):
    """An error caused by input or environment that the user can fix.

    Its message is printed, logged and stored as a failure reason, so a secret carried by a
    URL in it (a password in the user part or the query string) is redacted here, once.
    """

    exit_code = 2

    def __init__(self, *args: object) -> None:
        from shiftcost.redaction import redact_text

        super().__init__(*(redact_text(arg) if isinstance(arg, str) else arg for arg in args))


class InputError(ShiftcostError):
    """A file, tensor or argument given by the user is unusable."""


class ConfigError(ShiftcostError):
    """A setting is missing or inconsistent."""


# Colour and style codes some libraries put in their messages (torch's load advice does).
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def short_error(error: BaseException, limit: int = 120) -> str:
    """An underlying error's message on one line, cut to ``limit`` characters, to quote inside a sentence."""
    text = " ".join(_TERMINAL_CODES.sub("", str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
