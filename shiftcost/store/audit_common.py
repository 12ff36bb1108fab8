"""What every audit query shares: its result, how it runs and keeps its SQL, common filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import String

from shiftcost.store.models import Model


@dataclass
class AuditResult:
    """Rows of one audit query, the column order to show, totals, and the SQL that ran.

    ``parameters`` holds each statement's bound (name, value) pairs, in the order of its placeholders.
    """

    name: str
    columns: list[str]
    rows: list[dict[str, Any]]
    totals: dict[str, Any] = field(default_factory=dict)
    sql: list[str] = field(default_factory=list)
    parameters: list[list[tuple[str, Any]]] = field(default_factory=list)


class utc_day(FunctionElement[str]):
    """The UTC calendar day of a timestamp as ``YYYY-MM-DD`` text, on SQLite and PostgreSQL."""

    type = String()
    inherit_cache = True


@compiles(utc_day)
def _utc_day_sqlite(element: utc_day, compiler: Any, **kw: Any) -> str:
    # SQLite stores the timestamps as UTC text; date() keeps the day part.
    return f"date({compiler.process(element.clauses, **kw)})"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: Any, **kw: Any) -> str:
    return f"to_char(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


class _Runner:
    """Runs Core statements on the session's connection and keeps their SQL for the result."""

    def __init__(self, session: Session) -> None:
        self.connection = session.connection()
        self.sql: list[str] = []
        self.parameters: list[list[tuple[str, Any]]] = []

    def record(self, query: Select) -> None:
        """Keep ``query``'s SQL as this database runs it (lists expanded) and its bound values."""
        compiled = query.compile(dialect=self.connection.dialect, compile_kwargs={"render_postcompile": True})
        names = compiled.positiontup if compiled.positional else list(compiled.params)
        self.sql.append(str(compiled))
        self.parameters.append([(name, compiled.params[name]) for name in names or ()])

    def rows(self, query: Select) -> list[dict[str, Any]]:
        self.record(query)
        result = self.connection.execute(query)
        keys = list(result.keys())
        return [dict(zip(keys, row, strict=True)) for row in result.all()]

    def one(self, query: Select) -> dict[str, Any]:
        return self.rows(query)[0]


def _window(query: Select, column: Any, since: datetime | None, until: datetime | None) -> Select:
    if since is not None:
        query = query.where(column >= since)
    if until is not None:
        query = query.where(column < until)
    return query


def _model_ids(model: str) -> Select:
    """``SELECT id FROM models WHERE name = :model``: every version of a model name."""
    return select(Model.id).where(Model.name == model)


def _newest(query: Select, limit: int | None, *keys: str) -> Select:
    """Order by the selected columns ``keys``; with ``limit``, keep the newest rows, oldest first."""
    order = [query.selected_columns[key] for key in keys]
    if limit is None:
        return query.order_by(*order)
    newest = query.order_by(*(column.desc() for column in order)).limit(limit).subquery()
    return select(newest).order_by(*(newest.c[key] for key in keys))


def _float(value: Any) -> float:
    return float(value or 0.0)
