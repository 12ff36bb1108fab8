"""Errors a user can cause and fix.

Every message is one sentence that names the input at fault and what to do about it.
The CLI prints the message alone (no traceback) and exits non-zero; library callers
catch ``ShiftcostError`` to tell user errors from bugs.
"""


class ShiftcostError(Exception):
    """An error caused by input or environment that the user can fix."""

    exit_code = 2


class InputError(ShiftcostError):
    """A file, tensor or argument given by the user is unusable."""


class ConfigError(ShiftcostError):
    """A setting is missing or inconsistent."""
