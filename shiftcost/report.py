"""One self-contained HTML report of what shifted, what was predicted, decided and spent.

Everything comes from the database, through the audit queries of
:mod:`shiftcost.store.audit` and two read-only statements here (the per-batch overview
and the ledger timeline, SQL in their docstrings), so the same report can be produced for
any shiftcost database, SQLite or PostgreSQL, long after the runs.

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
import html
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from shiftcost.errors import InputError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shiftcost.store.audit import AuditResult
    from shiftcost.store.db import Database

__all__ = ["PLOTS", "ReportData", "ReportSummary", "collect", "render_html", "write_report"]

#: The plots every report holds, in page order.
PLOTS = ("indices", "energy", "budget", "decisions")

#: Shift indices shown, as stored in ``index_runs``, with their display names.
INDEX_COLUMNS = {
    "resque_dist": "RESQUE_dist",
    "inv_ari": "inv_ARI",
    "layer_shift": "layer shift",
    "resque_task": "RESQUE_task",
    "preindex_p": "PreIndex p",
}

ACTIONS = ("retrain", "defer", "skip")
_ACTION_COLOURS = {"retrain": "#2b8a3e", "defer": "#e8890c", "skip": "#868e96"}
_DEFAULT_LIMIT = 1000
#: The drift report row that holds a batch's overall verdict (the others are per test group).
OVERALL_FEATURE_SET = "overall"


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


def batch_overview(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = _DEFAULT_LIMIT,
) -> list[dict[str, Any]]:
    """One row per batch: indices, drift tests, the latest decision, its prediction and run.

    SELECT b.id AS batch_id, b.source_uri, b.registered_at, b.status, b.failure_reason,
           b.samples, m.version AS model_version,
           ir.resque_dist, ir.inv_ari, ir.layer_shift, ir.resque_task, ir.preindex_p,
           ir.accuracy,
           (SELECT count(*) FROM drift_reports dr WHERE dr.batch_id = b.id) AS drift_tests,
           (SELECT count(*) FROM drift_reports dr WHERE dr.batch_id = b.id
              AND dr.drift_detected) AS drift_detected_tests,
           (SELECT drift_detected FROM drift_reports WHERE id = (SELECT max(id) FROM drift_reports
              WHERE batch_id = b.id AND feature_set = 'overall')) AS drift_verdict,
           d.id AS decision_id, d.action, d.blocked_by_budget, d.reasons,
           cp.epochs AS predicted_epochs, cp.energy_kwh AS predicted_kwh,
           cp.energy_kwh_lower AS predicted_kwh_lower, cp.energy_kwh_upper AS predicted_kwh_upper,
           cp.emissions_kg AS predicted_co2, cp.emissions_kg_upper AS predicted_co2_upper,
           cp.interval_level, rr.id AS run_id, rr.status AS run_status, rr.epochs AS actual_epochs,
           rr.energy_kwh AS actual_kwh, rr.emissions_kg AS actual_co2
    FROM batches b
    JOIN models m ON m.id = b.model_id
    LEFT JOIN index_runs ir ON ir.id = (SELECT max(id) FROM index_runs WHERE batch_id = b.id)
    LEFT JOIN decisions d ON d.id = (SELECT max(id) FROM decisions WHERE batch_id = b.id)
    LEFT JOIN cost_predictions cp ON cp.id = coalesce(d.cost_prediction_id,
              (SELECT max(id) FROM cost_predictions WHERE index_run_id = ir.id))
    LEFT JOIN retrain_runs rr ON rr.id = (SELECT max(id) FROM retrain_runs WHERE batch_id = b.id)
    WHERE b.model_name = :model AND b.registered_at >= :since AND b.registered_at < :until
    ORDER BY b.registered_at, b.id                 -- the newest :limit batches when limited

    The latest index run, decision and retrain run of a batch stand for it (a deferred
    batch assessed again shows its last decision). ``drift`` is the stored overall verdict;
    without one, whether any test drifted; without tests, what the decision's reasons say.
    """
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    from shiftcost.store.models import Batch, CostPrediction, Decision, DriftReport, IndexRun, Model, RetrainRun

    b = Batch
    ir, d, cp, rr = IndexRun, Decision, CostPrediction, RetrainRun
    m = aliased(Model, name="m")
    dr = aliased(DriftReport, name="dr")

    def newest_id(table: Any, key: str, value: Any, **equal: Any) -> Any:
        # An alias of its own, so the subquery never correlates with the outer join.
        inner = aliased(table)
        conditions = [getattr(inner, key) == value, *(getattr(inner, name) == v for name, v in equal.items())]
        return select(func.max(inner.id)).where(*conditions).correlate_except(inner).scalar_subquery()

    tests = select(func.count()).select_from(dr).where(dr.batch_id == b.id).scalar_subquery()
    drifted = (
        select(func.count()).select_from(dr).where(dr.batch_id == b.id, dr.drift_detected.is_(True)).scalar_subquery()
    )
    overall = aliased(DriftReport, name="overall")
    verdict = (
        select(overall.drift_detected)
        .where(overall.id == newest_id(DriftReport, "batch_id", b.id, feature_set=OVERALL_FEATURE_SET))
        .scalar_subquery()
    )
    prediction_id = func.coalesce(d.cost_prediction_id, newest_id(CostPrediction, "index_run_id", ir.id))
    query = (
        select(
            b.id.label("batch_id"), b.source_uri, b.registered_at, b.status, b.failure_reason, b.samples,
            m.version.label("model_version"),
            *(getattr(ir, column) for column in INDEX_COLUMNS), ir.accuracy,
            tests.label("drift_tests"), drifted.label("drift_detected_tests"), verdict.label("drift_verdict"),
            d.id.label("decision_id"), d.action, d.blocked_by_budget, d.reasons,
            cp.epochs.label("predicted_epochs"), cp.energy_kwh.label("predicted_kwh"),
            cp.energy_kwh_lower.label("predicted_kwh_lower"), cp.energy_kwh_upper.label("predicted_kwh_upper"),
            cp.emissions_kg.label("predicted_co2"), cp.emissions_kg_upper.label("predicted_co2_upper"),
            cp.interval_level, rr.id.label("run_id"), rr.status.label("run_status"),
            rr.epochs.label("actual_epochs"), rr.energy_kwh.label("actual_kwh"), rr.emissions_kg.label("actual_co2"),
        )
        .select_from(b)
        .join(m, m.id == b.model_id)
        .outerjoin(ir, ir.id == newest_id(IndexRun, "batch_id", b.id))
        .outerjoin(d, d.id == newest_id(Decision, "batch_id", b.id))
        .outerjoin(cp, cp.id == prediction_id)
        .outerjoin(rr, rr.id == newest_id(RetrainRun, "batch_id", b.id))
    )
    if model is not None:
        query = query.where(b.model_name == model)
    query = _window(query, b.registered_at, since, until)
    if limit is None:
        query = query.order_by(b.registered_at, b.id)
    else:
        newest = query.order_by(b.registered_at.desc(), b.id.desc()).limit(limit).subquery()
        query = select(newest).order_by(newest.c.registered_at, newest.c.batch_id)
    rows = _rows(session, query)
    for row in rows:
        row["name"] = short_name(row["source_uri"])
        tests_run = int(row["drift_tests"] or 0)
        if row["drift_verdict"] is not None:
            row["drift"] = bool(row["drift_verdict"])
        else:
            row["drift"] = None if tests_run == 0 else bool(row["drift_detected_tests"])
        if row["drift"] is None and row["reasons"]:
            # Without stored tests, the decision still says whether drift was seen.
            codes = {reason.get("code") for reason in row["reasons"] if isinstance(reason, dict)}
            row["drift"] = True if "drift_detected" in codes else False if "no_drift" in codes else None
    return rows


def ledger_timeline(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Every ledger entry in time order, with its budget's caps and the reservation it closes.

    SELECT e.id, e.created_at, e.kind, e.energy_kwh, e.emissions_kg, e.decision_id,
           r.energy_kwh AS reserved_kwh, r.emissions_kg AS reserved_co2,
           coalesce(r0.created_at, r.created_at) AS reserved_at,
           bu.name AS budget, bu.period, bu.kwh_cap, bu.co2_cap, b.source_uri
    FROM budget_ledger e
    JOIN budgets bu ON bu.id = e.budget_id
    LEFT JOIN budget_ledger r ON r.id = e.reservation_id
    LEFT JOIN budget_ledger r0 ON r0.id = r.reservation_id  -- a late settlement's reservation
    JOIN decisions d ON d.id = e.decision_id
    JOIN batches b ON b.id = d.batch_id
    WHERE d.model_id IN (SELECT id FROM models WHERE name = :model)
      AND e.created_at >= :since AND e.created_at < :until
    ORDER BY e.created_at, e.id
    """
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from shiftcost.store.models import Batch, Budget, Decision, LedgerEntry, Model

    from sqlalchemy import func

    e = aliased(LedgerEntry, name="e")
    r = aliased(LedgerEntry, name="r")
    r0 = aliased(LedgerEntry, name="r0")
    query = (
        select(
            e.id, e.created_at, e.kind, e.energy_kwh, e.emissions_kg, e.decision_id,
            r.energy_kwh.label("reserved_kwh"), r.emissions_kg.label("reserved_co2"),
            func.coalesce(r0.created_at, r.created_at).label("reserved_at"), Budget.name.label("budget"),
            Budget.period, Budget.kwh_cap, Budget.co2_cap, Batch.source_uri,
        )
        .select_from(e)
        .join(Budget, Budget.id == e.budget_id)
        .outerjoin(r, r.id == e.reservation_id)
        .outerjoin(r0, r0.id == r.reservation_id)
        .join(Decision, Decision.id == e.decision_id)
        .join(Batch, Batch.id == Decision.batch_id)
        .order_by(e.created_at, e.id)
    )
    if model is not None:
        query = query.where(Decision.model_id.in_(select(Model.id).where(Model.name == model)))
    return _rows(session, _window(query, e.created_at, since, until))


def _window(query: Any, column: Any, since: datetime | None, until: datetime | None) -> Any:
    """``column >= since AND column < until``, each only when given (bound parameters)."""
    if since is not None:
        query = query.where(column >= since)
    if until is not None:
        query = query.where(column < until)
    return query


def _rows(session: Session, query: Any) -> list[dict[str, Any]]:
    result = session.execute(query)
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result]


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
    limit: int | None = _DEFAULT_LIMIT,
    database: str = "",
) -> ReportData:
    """Read everything the report shows through the audit queries and the two above."""
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


def short_name(uri: str | None) -> str:
    """The last path component of a batch URI (``04-gaussian_noise-0.2.npz``)."""
    if not uri:
        return ""
    return PurePosixPath(uri.rstrip("/").replace("\\", "/")).name or uri


# ----------------------------------------------------------------------------- plots


def _figure(height: float, rows: int = 1, sharex: bool = True) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, height), dpi=100, layout="constrained")
    axes = figure.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    return figure, axes


def _time_axis(axes: Any) -> None:
    """Readable time ticks whatever the span (seconds of a demo or months of production)."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_xlabel("time (UTC)", fontsize=9)


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _empty(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="#495057", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        axes.spines[side].set_color("#ced4da")


def _batch_ticks(axes: Any, names: Sequence[str]) -> None:
    axes.set_xticks(range(len(names)))
    if len(names) <= 40:
        axes.set_xticklabels([_abbreviate(name) for name in names], rotation=35, ha="right", fontsize=8)
    else:
        axes.set_xticklabels([])
        axes.set_xlabel(f"{len(names)} batches in arrival order")


def _abbreviate(name: str, width: int = 28) -> str:
    name = name.removesuffix(".npz").removesuffix(".pt")
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_indices(batches: Sequence[dict[str, Any]]) -> bytes:
    """Shift indices per batch, one panel per index with data; drifted batches in red."""
    present = [column for column in INDEX_COLUMNS if any(row.get(column) is not None for row in batches)]
    figure, axes = _figure(2.0 + 1.6 * max(len(present), 1), rows=max(len(present), 1))
    if not present:
        _empty(axes[0], "No index runs in this selection")
        return _png(figure)
    names = [row["name"] for row in batches]
    for panel, column in zip(axes, present):
        xs = [i for i, row in enumerate(batches) if row.get(column) is not None]
        ys = [float(batches[i][column]) for i in xs]
        panel.plot(xs, ys, color="#adb5bd", linewidth=1, zorder=1)
        colours = ["#c92a2a" if batches[i]["drift"] else "#1c7ed6" if batches[i]["drift"] is False else "#868e96" for i in xs]
        panel.scatter(xs, ys, c=colours, s=36, zorder=2)
        panel.set_ylabel(INDEX_COLUMNS[column], fontsize=9)
        panel.grid(True, axis="y", alpha=0.3)
    axes[0].set_title("Shift indices per batch (red: drift detected, blue: no drift)", fontsize=11)
    _batch_ticks(axes[-1], names)
    return _png(figure)


def plot_energy(batches: Sequence[dict[str, Any]]) -> bytes:
    """Predicted kWh (point and interval) of every assessed batch and measured kWh of each retrain."""
    assessed = [row for row in batches if row.get("predicted_kwh") is not None or row.get("actual_kwh") is not None]
    figure, (axes,) = _figure(4.6)
    if not assessed:
        _empty(axes, "No cost predictions or retrain runs in this selection")
        return _png(figure)
    for i, row in enumerate(assessed):
        predicted = row.get("predicted_kwh")
        if predicted is not None:
            low = row.get("predicted_kwh_lower")
            high = row.get("predicted_kwh_upper")
            colour = _ACTION_COLOURS.get(row.get("action") or "", "#495057")
            error = None
            if low is not None and high is not None:
                error = [[max(predicted - low, 0.0)], [max(high - predicted, 0.0)]]
            axes.errorbar([i - 0.08], [predicted], yerr=error, fmt="o", color=colour, ecolor=colour,
                          elinewidth=2, capsize=5, markersize=7, label="_predicted")
        actual = row.get("actual_kwh")
        if actual is not None:
            capped = row.get("run_status") == "cap_reached"
            axes.scatter([i + 0.08], [actual], marker="D", s=60, zorder=3,
                         facecolors="none" if capped else "#000000", edgecolors="#000000")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_ACTION_COLOURS[a], marker="o", linewidth=2, label=f"predicted, {a} (interval bars)")
        for a in ACTIONS if any(row.get("action") == a and row.get("predicted_kwh") is not None for row in assessed)
    ]
    handles.append(Line2D([], [], color="#000000", marker="D", linestyle="none", label="measured (hollow: cap reached)"))
    axes.legend(handles=handles, fontsize=8, loc="upper left")
    axes.set_ylabel("energy (kWh)")
    positive = [v for row in assessed for v in (row.get("predicted_kwh"), row.get("predicted_kwh_upper"), row.get("actual_kwh"))
                if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 30:
        # Costs of different shifts span orders of magnitude; a linear axis flattens the small ones.
        axes.set_yscale("log")
        axes.set_ylim(bottom=min(positive) / 3)
        axes.set_ylabel("energy (kWh, log scale)")
    else:
        axes.set_ylim(bottom=0)
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_title("Predicted vs measured retraining energy", fontsize=11)
    _batch_ticks(axes, [row["name"] for row in assessed])
    return _png(figure)


def plot_budget(series: dict[str, list[dict[str, Any]]], end: datetime | None = None) -> bytes:
    """Remaining (or spent) kWh and kg CO2e of each budget after every ledger entry.

    With ``end`` (e.g. the last decision), each line is carried on to that time, so the
    decisions taken after the last ledger entry can be read against what was left.
    """
    figure, axes = _figure(6.0, rows=2)
    if not series:
        for panel in axes:
            _empty(panel, "No budget ledger entries in this selection")
        return _png(figure)
    palette = ["#1c7ed6", "#c92a2a", "#2b8a3e", "#e8890c", "#7048e8", "#0c8599"]
    for panel, measure, unit in ((axes[0], "kwh", "kWh"), (axes[1], "co2", "kg CO2e")):
        drawn = False
        for colour, (name, points) in zip(palette * 10, sorted(series.items())):
            times = [point["at"] for point in points]
            remaining = [point[f"remaining_{measure}"] for point in points]
            if all(value is not None for value in remaining):
                values, what = remaining, "remaining"
                cap = points[-1][f"{measure}_cap"]
                panel.axhline(0.0, color="#495057", linewidth=0.8)
                panel.axhline(cap, color=colour, linestyle=":", linewidth=1)
            else:
                values, what = [point[f"spent_{measure}"] for point in points], "spent"
            line_times, line_values = list(times), list(values)
            if end is not None and end > times[-1]:
                line_times.append(end)
                line_values.append(values[-1])
            panel.step(line_times, line_values, where="post", color=colour, linewidth=2, label=f"{name}: {what}")
            markers = {"reserve": "v", "settle": "o", "release": "^"}
            for kind, marker in markers.items():
                chosen = [(t, v) for t, v, p in zip(times, values, points) if p["kind"] == kind]
                if chosen:
                    panel.scatter(*zip(*chosen), marker=marker, color=colour, s=30, zorder=3)
            drawn = True
        if drawn:
            panel.legend(fontsize=8, loc="best")
        panel.set_ylabel(unit)
        panel.grid(True, alpha=0.3)
    axes[0].set_title("Budget burn-down (▼ reserve, ● settle, ▲ release; dotted: cap)", fontsize=11)
    _time_axis(axes[1])
    return _png(figure)


def plot_decisions(decision_rows: Sequence[dict[str, Any]]) -> bytes:
    """Decisions over time, one lane per action, labelled with their batch when few."""
    rows = sorted(decision_rows, key=lambda row: (row["created_at"], row["decision_id"]))
    figure, (axes,) = _figure(3.4)
    if not rows:
        _empty(axes, "No decisions in this selection")
        return _png(figure)
    lanes = {action: position for position, action in enumerate(reversed(ACTIONS))}
    for action in ACTIONS:
        chosen = [row for row in rows if row["action"] == action]
        if chosen:
            axes.scatter([row["created_at"] for row in chosen], [lanes[action]] * len(chosen), s=80,
                         color=_ACTION_COLOURS[action], edgecolors=["#c92a2a" if row["blocked_by_budget"] else "none" for row in chosen],
                         linewidths=2, zorder=3, label=action)
    if len(rows) <= 30:
        for number, row in enumerate(rows):
            axes.annotate(_abbreviate(short_name(row.get("source_uri")), 18), (row["created_at"], lanes[row["action"]]),
                          xytext=(0, 9 if number % 2 else -14), textcoords="offset points", ha="center", fontsize=7)
    axes.set_yticks(list(lanes.values()))
    axes.set_yticklabels(list(lanes))
    axes.set_ylim(-0.7, len(lanes) - 0.3)
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_title("Decisions over time (red ring: held back by a budget)", fontsize=11)
    _time_axis(axes)
    return _png(figure)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#212529;padding:0 1em}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #dee2e6;padding-bottom:.2em}
.meta{color:#495057;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;width:100%}
th,td{border:1px solid #dee2e6;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f1f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.retrain{color:#2b8a3e;font-weight:600}.defer{color:#e8890c;font-weight:600}.skip{color:#868e96;font-weight:600}
.failed{color:#c92a2a}figure{margin:1em 0}img{max-width:100%;border:1px solid #e9ecef}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#f8f9fa;border:1px solid #e9ecef;padding:.6em 1em;border-radius:6px}
.card b{display:block;font-size:1.3em}details{margin:.4em 0}code{font-size:.85em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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


def _table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """An HTML table; each cell is (text already escaped, css class)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>" for text, cls in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any) -> tuple[str, str]:
    return _e(_fmt(value)), "num"


def _text(value: Any, cls: str = "") -> tuple[str, str]:
    return _e(_fmt(value)), cls


def _batches_table(batches: Sequence[dict[str, Any]]) -> str:
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
    return _table(headers, rows)


def _errors_table(data: ReportData) -> str:
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
        summary = (f"<p>{totals['runs']} measured retrain run(s); median absolute error of the kWh prediction "
                   f"{_e(_fmt(totals.get('kwh_mdape_pct'), 3))}%, interval coverage "
                   f"{_e('' if coverage is None else f'{100 * coverage:.0f}%')}.</p>")
    return summary + _table(headers, rows)


def _decisions_table(data: ReportData) -> str:
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
    return f"<p>{_e(totals.get('decisions', 0))} decision(s): {_e(note or 'none')}{_e(shown)}.</p>" + _table(headers, rows)


def _budget_table(data: ReportData) -> str:
    headers = ["budget", "period", "reservations", "open", "released", "settled kWh", "reserved kWh",
               "remaining kWh", "settled kg CO2e", "reserved kg CO2e", "remaining kg CO2e", "kWh cap", "kg CO2e cap"]
    rows = [
        [
            _text(row["budget"]), _text(f"{row['budget_period']} {row['period']}"), _num(row["reservations"]), _num(row["open"]),
            _num(row["released"]), _num(row["settled_kwh"]), _num(row["reserved_kwh"]), _num(row["remaining_kwh"]),
            _num(row["settled_co2"]), _num(row["reserved_co2"]), _num(row["remaining_co2"]), _num(row["kwh_cap"]),
            _num(row["co2_cap"]),
        ]
        for row in data.budget.rows
    ]
    return _table(headers, rows)


def _calibrations_table(data: ReportData) -> str:
    headers = ["version", "time (UTC)", "architecture", "source", "points", "leave-one-out error (MdAPE, epochs)", "interval level"]
    rows = [
        [_num(row["version"]), _text(row["created_at"]), _text(row["architecture"]), _text(row["source"]),
         _num(row["n_points"]), _num(row["loo_error"]), _num(row["interval_level"])]
        for row in data.calibrations.rows
    ]
    return _table(headers, rows)


def _cards(data: ReportData) -> str:
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
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards) + "</div>"


def render_html(data: ReportData, plots: dict[str, bytes] | None = None) -> str:
    """The whole report as one HTML document (plots rendered now unless given)."""
    plots = plots if plots is not None else render_plots(data)
    filters = ", ".join(f"{k}={_fmt(v)}" for k, v in data.filters.items() if v is not None) or "none"
    captions = {
        "indices": ("Shift indices per batch", "From the one forward pass over each batch, against the model's reference stats."),
        "energy": ("Predicted vs measured energy", "Dots: predicted kWh with the prediction interval; diamonds: kWh measured by CodeCarbon during the retrain. "
                   "On a log scale, an interval whose lower bound is 0 runs off the bottom."),
        "budget": ("Budget burn-down", "What each budget has left in its period after every reservation, settlement and release."),
        "decisions": ("Decisions", "Every retrain / defer / skip decision in time order."),
    }
    figures = []
    for name in PLOTS:
        title, caption = captions[name]
        encoded = base64.b64encode(plots[name]).decode("ascii")
        figures.append(
            f'<h2 id="{name}">{_e(title)}</h2><figure><img id="plot-{name}" alt="{_e(title)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption class="meta">{_e(caption)}</figcaption></figure>'
        )
    sections = [
        figures[0],
        "<h2>Batches</h2>" + _batches_table(data.batches),
        figures[1],
        "<h2>Predicted vs actual (measured retrains)</h2>" + _errors_table(data),
        figures[2],
        "<h2>Budgets</h2>" + _budget_table(data),
        figures[3],
        "<h2>Decision log</h2>" + _decisions_table(data),
        "<h2>Cost model versions</h2>" + _calibrations_table(data),
    ]
    notes = "".join(f"<p class=\"meta\">{_e(note)}</p>" for note in data.notes)
    sql = "".join(
        f"<details><summary>{_e(result.name)}</summary><pre><code>{_e(chr(10).join(result.sql))}</code></pre></details>"
        for result in (data.errors, data.cost, data.decisions, data.budget, data.calibrations)
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(data.title)}</h1>"
        f"<p class=\"meta\">Database {_e(data.database)} · filters: {_e(filters)} · generated "
        f"{_e(_fmt(data.generated_at))} UTC</p>{notes}{_cards(data)}"
        + "".join(sections)
        + f"<h2>Audit SQL</h2>{sql}</body></html>\n"
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
    limit: int | None = _DEFAULT_LIMIT,
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
