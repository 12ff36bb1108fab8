"""Errors the storage layer raises for faults a user can fix.

All are ``ShiftcostError`` subclasses, so the CLI prints their one-sentence message
without a traceback and library callers can tell them from bugs.
"""

from __future__ import annotations

from shiftcost.errors import InputError, ShiftcostError


class StoreError(ShiftcostError):
    """A storage problem the user can fix."""


class DatabaseUnavailableError(StoreError):
    """The database cannot be reached, or refuses the credentials."""

    exit_code = 3


class DatabaseBusyError(DatabaseUnavailableError):
    """Another process held the SQLite write lock past the busy timeout (a passing fault)."""


class SchemaVersionError(StoreError):
    """The database schema is older (or newer) than this version of shiftcost expects."""

    exit_code = 4


class NotFoundError(StoreError, InputError):
    """A named row (model, budget, reservation, ...) does not exist."""


class BudgetError(StoreError, InputError):
    """A budget definition is invalid (negative cap, unknown period, duplicate name)."""


class BudgetExceededError(StoreError):
    """A reservation does not fit the remaining budget of its period."""

    def __init__(self, message: str, *, budget: str, remaining_kwh: float | None,
                 remaining_co2: float | None) -> None:
        super().__init__(message)
        self.budget = budget
        self.remaining_kwh = remaining_kwh
        self.remaining_co2 = remaining_co2


class ReservationError(StoreError, InputError):
    """A settle or release names a reservation that is unknown or already closed."""
