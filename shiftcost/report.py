"""One self-contained HTML report of what shifted, what was predicted, decided and spent.

Everything comes from the database, through the audit queries of
:mod:`shiftcost.store.audit` and the two read-only statements of
:mod:`shiftcost.store.report_queries` (the per-batch overview and the ledger timeline), so
the same report can be produced for any shiftcost database, SQLite or PostgreSQL, long
after the runs. The page is rendered from the Jinja2 template ``templates/report.html.j2``
with autoescaping on, so text from the database is always escaped.

Plots are PNG images embedded as base64 ``data:`` URIs (no file next to the report, no
script, nothing fetched when it is opened):

* ``indices``: the shift indices of every batch, drifted batches marked;
* ``energy``: predicted kWh with its interval for every assessed batch, and the measured
  kWh of those retrained;
* ``budget``: the budget burn-down, remaining kWh and kg CO2e after every ledger entry;
* ``decisions``: the decisions over time, one lane per action.

matplotlib is imported inside the plotting functions and used through its object API
(``Figure`` + the Agg canvas), so no global backend is switched and no window opens.
"""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from shiftcost.errors import InputError
from shiftcost.report_plots import INDEX_COLUMNS, plot_budget, plot_decisions, plot_energy, plot_indices
from shiftcost.store.report_queries import DEFAULT_LIMIT, OVERALL_FEATURE_SET, batch_overview, ledger_timeline, short_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shiftcost.store.audit import AuditResult
    from shiftcost.store.db import Database

__all__ = [
    "OVERALL_FEATURE_SET",
    "PLOTS",
    "ReportData",
    "ReportSummary",
    "batch_overview",
    "collect",
    "ledger_timeline",
    "render_html",
    "short_name",
    "write_report",
]

#: The plots every report holds, in page order.
PLOTS = ("indices", "energy", "budget", "decisions")

# ----------------------------------------------------------------------------- data


@dataclass
class ReportData:
    """Everything the report shows, read in one read-only transaction."""

    database: str
    filters: dict[str, Any]
    generated_at: datetime
    batches: list[dict[str, Any]]
    ledger: list[dict[str, Any]]
    errors: AuditResult
    cost: AuditResult
    decisions: AuditResult
    budget: AuditResult
    calibrations: AuditResult
    title: str = "shiftcost report"
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`write_report` wrote: the file, its plots and the counts behind them."""

    path: Path
    plots: tuple[str, ...]
    batches: int
    decisions: int
    retrain_runs: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "plots": list(self.plots), "batches": self.batches,
                "decisions": self.decisions, "retrain_runs": self.retrain_runs, "bytes": self.bytes}


def burn_down(ledger_rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per budget, the spend of the entry's period after each ledger entry, in time order.

    The ledger's own accounting rule, entry by entry (``ledger.entry_effect``), in the
    period of the reservation's time (``ledger.period_key``): daily and monthly budgets
    restart at their period boundary; ``remaining`` is the cap minus that spend (None for an
    uncapped measure, and for ``per_run`` budgets, whose cap applies to each run alone).
    """
    from shiftcost.store import ledger

    spent: dict[tuple[str, Any], list[float]] = {}
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in ledger_rows:
        reserved_at = entry["reserved_at"] or entry["created_at"]
        key = (entry["budget"], ledger.period_key(entry["period"], reserved_at))
        totals = spent.setdefault(key, [0.0, 0.0])
        totals[0] += ledger.entry_effect(entry["kind"], entry["energy_kwh"], entry["reserved_kwh"])
        totals[1] += ledger.entry_effect(entry["kind"], entry["emissions_kg"], entry["reserved_co2"])
        capped = entry["period"] != "per_run"
        series.setdefault(entry["budget"], []).append(
            {
                "at": entry["created_at"],
                "kind": entry["kind"],
                "batch": short_name(entry["source_uri"]),
                "spent_kwh": totals[0],
                "spent_co2": totals[1],
                "kwh_cap": entry["kwh_cap"],
                "co2_cap": entry["co2_cap"],
                "remaining_kwh": entry["kwh_cap"] - totals[0] if capped and entry["kwh_cap"] is not None else None,
                "remaining_co2": entry["co2_cap"] - totals[1] if capped and entry["co2_cap"] is not None else None,
                "period": entry["period"],
            }
        )
    return series


def collect(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = DEFAULT_LIMIT,
    database: str = "",
) -> ReportData:
    """Read everything the report shows through the audit queries and those of :mod:`shiftcost.store.report_queries`."""
    from shiftcost.store import audit

    filters = {"model": model, "since": since, "until": until}
    return ReportData(
        database=database,
        filters={**filters, "limit": limit},
        generated_at=datetime.now(UTC),
        batches=batch_overview(session, limit=limit, **filters),
        ledger=ledger_timeline(session, **filters),
        errors=audit.prediction_errors(session, **filters),
        cost=audit.cost_history(session, **filters),
        decisions=audit.decisions(session, limit=limit, **filters),
        budget=audit.budget_burn(session, **filters),
        calibrations=audit.calibrations(session, **filters),
    )


# ----------------------------------------------------------------------------- HTML

def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _interval(low: Any, high: Any) -> str:
    if low is None or high is None:
        return ""
    return f"[{_fmt(low)}, {_fmt(high)}]"


def reason_text(reasons: Any) -> str:
    """The deciding reasons of a stored decision as sentences (blocking ones, else the allowing)."""
    if not reasons:
        return ""
    items = reasons if isinstance(reasons, list) else [reasons]
    dicts = [item for item in items if isinstance(item, dict)]
    deciding = [item for item in dicts if item.get("blocking")] or [item for item in dicts if item.get("effect") == "allow"] or dicts
    texts = [str(item.get("message") or item.get("code") or item) for item in deciding]
    texts += [str(item) for item in items if not isinstance(item, dict)]
    return " ".join(texts)


@dataclass(frozen=True)
class Table:
    """A table for the template: plain-text cells (escaped when rendered), each with a CSS class."""

    headers: Sequence[str]
    rows: Sequence[Sequence[tuple[str, str]]]
    summary: str = ""


def _num(value: Any) -> tuple[str, str]:
    return _fmt(value), "num"


def _text(value: Any, cls: str = "") -> tuple[str, str]:
    return _fmt(value), cls


def _batches_table(batches: Sequence[dict[str, Any]]) -> Table:
    present = [column for column in INDEX_COLUMNS if any(row.get(column) is not None for row in batches)]
    headers = ["#", "batch", "status", "drift", *(INDEX_COLUMNS[c] for c in present), "accuracy",
               "predicted kWh", "interval", "decision", "actual kWh", "actual epochs"]
    rows = []
    for row in batches:
        status_cls = "failed" if row["status"] == "failed" else ""
        status = row["status"] + (f": {row['failure_reason']}" if row.get("failure_reason") else "")
        drift = "" if row["drift"] is None else ("drift" if row["drift"] else "none")
        rows.append([
            _num(row["batch_id"]), _text(row["name"]), _text(status, status_cls), _text(drift),
            *(_num(row.get(column)) for column in present), _num(row.get("accuracy")),
            _num(row.get("predicted_kwh")), _text(_interval(row.get("predicted_kwh_lower"), row.get("predicted_kwh_upper"))),
            _text(row.get("action") or "", row.get("action") or ""), _num(row.get("actual_kwh")), _num(row.get("actual_epochs")),
        ])
    return Table(headers, rows)


def _errors_table(data: ReportData) -> Table:
    batch_of_run = {row["run_id"]: row.get("batch_id") for row in data.cost.rows}
    names = {row["batch_id"]: row["name"] for row in data.batches}
    headers = ["run", "batch", "status", "predicted kWh", "kWh interval", "actual kWh", "relative error", "in interval",
               "predicted epochs", "actual epochs", "predicted kg CO2e", "actual kg CO2e"]
    rows = []
    for row in data.errors.rows:
        batch_id = batch_of_run.get(row["run_id"])
        rel = row.get("kwh_relative_error")
        rows.append([
            _num(row["run_id"]), _text(names.get(batch_id, batch_id if batch_id is not None else "")), _text(row["status"]),
            _num(row["predicted_kwh"]), _text(_interval(row["energy_kwh_lower"], row["energy_kwh_upper"])),
            _num(row["actual_kwh"]), _text("" if rel is None else f"{100 * rel:+.1f}%"), _text(row["kwh_in_interval"]),
            _num(row["predicted_epochs"]), _num(row["actual_epochs"]), _num(row["predicted_co2"]), _num(row["actual_co2"]),
        ])
    totals = data.errors.totals
    summary = ""
    if totals.get("runs"):
        coverage = totals.get("kwh_coverage")
        summary = (f"{totals['runs']} measured retrain run(s); median absolute error of the kWh prediction "
                   f"{_fmt(totals.get('kwh_mdape_pct'), 3)}%, interval coverage "
                   f"{'' if coverage is None else f'{100 * coverage:.0f}%'}.")
    return Table(headers, rows, summary)


def _decisions_table(data: ReportData) -> Table:
    headers = ["decision", "time (UTC)", "batch", "model version", "action", "budget held it back",
               "predicted kWh (upper)", "reasons"]
    rows = [
        [
            _num(row["decision_id"]), _text(row["created_at"]), _text(short_name(row.get("source_uri"))), _num(row["version"]),
            _text(row["action"], row["action"]), _text(bool(row["blocked_by_budget"])), _num(row.get("predicted_kwh_upper")),
            _text(reason_text(row.get("reasons"))),
        ]
        for row in sorted(data.decisions.rows, key=lambda r: (r["created_at"], r["decision_id"]))
    ]
    totals = data.decisions.totals
    note = ", ".join(f"{count} {action}" for action, count in totals.get("by_action", {}).items())
    shown = "" if totals.get("shown", 0) >= totals.get("decisions", 0) else f" (newest {totals['shown']} shown)"
    return Table(headers, rows, f"{totals.get('decisions', 0)} decision(s): {note or 'none'}{shown}.")


def _budget_table(data: ReportData) -> Table:
    headers = ["budget", "period", "reservations", "open", "released", "settled kWh", "of it priced kWh", "reserved kWh",
               "remaining kWh", "settled kg CO2e", "reserved kg CO2e", "remaining kg CO2e", "kWh cap", "kg CO2e cap"]
    rows = [
        [
            _text(row["budget"]), _text(f"{row['budget_period']} {row['period']}"), _num(row["reservations"]), _num(row["open"]),
            _num(row["released"]), _num(row["settled_kwh"]), _num(row["priced_kwh"]), _num(row["reserved_kwh"]), _num(row["remaining_kwh"]),
            _num(row["settled_co2"]), _num(row["reserved_co2"]), _num(row["remaining_co2"]), _num(row["kwh_cap"]),
            _num(row["co2_cap"]),
        ]
        for row in data.budget.rows
    ]
    return Table(headers, rows)


def _calibrations_table(data: ReportData) -> Table:
    headers = ["version", "time (UTC)", "architecture", "source", "points", "leave-one-out error (MdAPE, epochs)", "interval level"]
    rows = [
        [_num(row["version"]), _text(row["created_at"]), _text(row["architecture"]), _text(row["source"]),
         _num(row["n_points"]), _num(row["loo_error"]), _num(row["interval_level"])]
        for row in data.calibrations.rows
    ]
    return Table(headers, rows)


def _cards(data: ReportData) -> list[tuple[str, str]]:
    errors = data.errors.rows
    predicted = sum(row["predicted_kwh"] or 0.0 for row in errors)
    actual = sum(row["actual_kwh"] or 0.0 for row in errors)
    by_action = data.decisions.totals.get("by_action", {})
    cards = [
        ("batches", str(len(data.batches))),
        ("retrained", str(by_action.get("retrain", 0))),
        ("deferred", str(by_action.get("defer", 0))),
        ("skipped", str(by_action.get("skip", 0))),
        ("failed batches", str(sum(1 for row in data.batches if row["status"] == "failed"))),
        ("retrain kWh predicted / measured", f"{_fmt(predicted)} / {_fmt(actual)}" if errors else "none"),
    ]
    return cards


#: Title and caption of each plot.
_CAPTIONS = {
    "indices": ("Shift indices per batch", "From the one forward pass over each batch, against the model's reference stats."),
    "energy": ("Predicted vs measured energy", "Dots: predicted kWh with the prediction interval; diamonds: kWh measured by CodeCarbon during the retrain. "
               "On a log scale, an interval whose lower bound is 0 runs off the bottom."),
    "budget": ("Budget burn-down", "What each budget has left in its period after every reservation, settlement and release."),
    "decisions": ("Decisions", "Every retrain / defer / skip decision in time order."),
}


@functools.cache
def _environment() -> jinja2.Environment:
    # Autoescaping everywhere: every cell, note and title from the database is escaped once, here.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("shiftcost", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_html(data: ReportData, plots: dict[str, bytes] | None = None) -> str:
    """The whole report as one HTML document (plots rendered now unless given)."""
    plots = plots if plots is not None else render_plots(data)
    figures = {
        name: {"name": name, "title": _CAPTIONS[name][0], "caption": _CAPTIONS[name][1],
               "png": base64.b64encode(plots[name]).decode("ascii")}
        for name in PLOTS
    }
    sections = [
        ("figure", figures["indices"]),
        ("table", ("Batches", _batches_table(data.batches))),
        ("figure", figures["energy"]),
        ("table", ("Predicted vs actual (measured retrains)", _errors_table(data))),
        ("figure", figures["budget"]),
        ("table", ("Budgets", _budget_table(data))),
        ("figure", figures["decisions"]),
        ("table", ("Decision log", _decisions_table(data))),
        ("table", ("Cost model versions", _calibrations_table(data))),
    ]
    return _environment().get_template("report.html.j2").render(
        title=data.title,
        database=data.database,
        filters=", ".join(f"{k}={_fmt(v)}" for k, v in data.filters.items() if v is not None) or "none",
        generated=_fmt(data.generated_at),
        notes=data.notes,
        cards=_cards(data),
        sections=sections,
        queries=[(result.name, "\n".join(result.sql)) for result in (data.errors, data.cost, data.decisions, data.budget, data.calibrations)],
    )


def render_plots(data: ReportData) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, keyed by the names in :data:`PLOTS`."""
    makers: dict[str, Callable[[], bytes]] = {
        "indices": lambda: plot_indices(data.batches),
        "energy": lambda: plot_energy(data.batches),
        "budget": lambda: plot_budget(burn_down(data.ledger), end=max((row["created_at"] for row in data.decisions.rows), default=None)),
        "decisions": lambda: plot_decisions(data.decisions.rows),
    }
    return {name: makers[name]() for name in PLOTS}


# ----------------------------------------------------------------------------- entry point


def write_report(
    database: Database | str,
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = DEFAULT_LIMIT,
    title: str = "shiftcost report",
    notes: Sequence[str] = (),
) -> ReportSummary:
    """Read the database (a ``Database`` or a URL) and write the HTML report to ``out``, atomically."""
    from shiftcost.store.db import Database, open_database, redact

    out = Path(out)
    if out.exists() and out.is_dir():
        raise InputError(f"The report path {out} is a folder; give a file name such as report.html.")
    if since is not None and until is not None and since >= until:
        raise InputError(f"--since ({since.isoformat()}) must be before --until ({until.isoformat()}).")
    owned = not isinstance(database, Database)
    db = open_database(database) if owned else database
    try:
        with db.session(readonly=True) as session:
            data = collect(session, model=model, since=since, until=until, limit=limit, database=redact(db.url))
    finally:
        if owned:
            db.dispose()
    data.title = title
    data.notes = list(notes)
    document = render_html(data).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_bytes(document)
    os.replace(temporary, out)
    return ReportSummary(
        path=out.resolve(),
        plots=PLOTS,
        batches=len(data.batches),
        decisions=int(data.decisions.totals.get("decisions", 0)),
        retrain_runs=int(data.cost.totals.get("runs", 0)),
        bytes=len(document),
    )
