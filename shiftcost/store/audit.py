"""Audit queries: what retraining cost, how good the predictions were, what was decided, why.

Each query is a SQLAlchemy Core statement; its SQL is in the function's docstring and
``AuditResult.sql`` holds every statement as compiled for the database it ran on, with
placeholders, and ``AuditResult.parameters`` the values bound to them. Filters are always
bound parameters, never formatted into the SQL.

Common filters: ``model`` (a model *name*: all its versions), ``since`` (inclusive) and
``until`` (exclusive), both UTC, on the natural timestamp of each query (run start,
decision time, reservation time, calibration time). ``limit`` keeps the newest rows
(shown oldest first for cost and errors, newest first for decisions); totals always
cover every matching row, from separate aggregate statements.

The budget-burn query is in ``audit_budget``, what the queries share in ``audit_common``;
everything is importable from here.
"""

from __future__ import annotations

import statistics
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from shiftcost.redaction import redact_url
from shiftcost.store.audit_budget import budget_burn
from shiftcost.store.audit_common import AuditResult, _float, _model_ids, _newest, _Runner, _window, utc_day
from shiftcost.store.models import Batch, Calibration, CostPrediction, Decision, Model, RetrainRun

__all__ = [
    "QUERIES",
    "AuditResult",
    "budget_burn",
    "calibrations",
    "cost_history",
    "decisions",
    "prediction_errors",
    "run",
    "utc_day",
]

QUERIES = ("cost", "errors", "decisions", "budget", "calibrations")


# --- cost history -----------------------------------------------------------------------


def cost_history(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> AuditResult:
    """Actual cost of every retrain run: kWh, kg CO2e, epochs, with status and method.

    SELECT rr.id AS run_id, rr.started_at, rr.finished_at, m.name AS model,
           m.version, nm.version AS new_version, rr.batch_id, rr.status, rr.reached_cutoff,
           rr.epochs, rr.steps, rr.energy_kwh, rr.emissions_kg, rr.energy_method,
           rr.carbon_intensity, rr.wall_seconds
    FROM retrain_runs rr
    JOIN models m ON m.id = rr.model_id
    LEFT JOIN models nm ON nm.id = rr.new_model_id
    WHERE rr.model_id IN (SELECT id FROM models WHERE name = :model)
      AND rr.started_at >= :since AND rr.started_at < :until
    ORDER BY rr.started_at, rr.id            -- newest :limit rows when limited

    Totals (all matching runs, no limit):
    SELECT rr.status, count(*), sum(rr.energy_kwh), sum(rr.emissions_kg), sum(rr.epochs)
    FROM retrain_runs rr WHERE <same filters> GROUP BY rr.status
    Runs without a measurement (running, failed before measuring) add nothing to sums.
    """
    rr = RetrainRun
    m = aliased(Model, name="m")
    nm = aliased(Model, name="nm")

    def filtered(query: Select) -> Select:
        return _runs_filtered(query, model, since, until)

    query = filtered(
        select(
            rr.id.label("run_id"), rr.started_at, rr.finished_at, m.name.label("model"),
            m.version, nm.version.label("new_version"), rr.batch_id, rr.status,
            rr.reached_cutoff, rr.epochs, rr.steps, rr.energy_kwh, rr.emissions_kg,
            rr.energy_method, rr.carbon_intensity, rr.wall_seconds,
        )
        .join(m, m.id == rr.model_id)
        .outerjoin(nm, nm.id == rr.new_model_id)
    )
    totals_query = filtered(
        select(
            rr.status, func.count().label("runs"), func.sum(rr.energy_kwh).label("energy_kwh"),
            func.sum(rr.emissions_kg).label("emissions_kg"), func.sum(rr.epochs).label("epochs"),
        ).group_by(rr.status)
    )
    runner = _Runner(session)
    rows = runner.rows(_newest(query, limit, "started_at", "run_id"))
    per_status = runner.rows(totals_query)
    totals = {
        "runs": sum(int(t["runs"]) for t in per_status),
        "by_status": {t["status"]: int(t["runs"]) for t in sorted(per_status, key=lambda t: t["status"])},
        "energy_kwh": sum(_float(t["energy_kwh"]) for t in per_status),
        "emissions_kg": sum(_float(t["emissions_kg"]) for t in per_status),
        "epochs": sum(_float(t["epochs"]) for t in per_status),
        "shown": len(rows),
    }
    columns = ["run_id", "started_at", "model", "version", "new_version", "status", "reached_cutoff",
               "epochs", "steps", "energy_kwh", "emissions_kg", "energy_method", "wall_seconds"]
    return AuditResult("cost", columns, rows, totals, runner.sql, runner.parameters)


# --- prediction error -----------------------------------------------------------------------

_MEASURES = {"epochs": ("epochs", "epochs"), "kwh": ("energy_kwh", "energy_kwh"),
             "co2": ("emissions_kg", "emissions_kg")}
#: Runs whose actual cost is measured; the last two stopped before the cutoff (cap or budget
#: guard), so their actual figures are a lower bound of what reaching it would have cost.
_MEASURED_STATUSES = ("succeeded", "cap_reached", "stopped_by_budget")
_STOPPED_STATUSES = ("cap_reached", "stopped_by_budget")
_FLAGS = [f"{measure}_in_interval" for measure in _MEASURES] + ["stopped_before_cutoff"]


def _runs_filtered(query: Select, model: str | None, since: datetime | None, until: datetime | None) -> Select:
    """Retrain runs of the model name (all versions) started in the window."""
    if model is not None:
        query = query.where(RetrainRun.model_id.in_(_model_ids(model)))
    return _window(query, RetrainRun.started_at, since, until)


def _relative_error(measure: str) -> Any:
    predicted, actual = getattr(CostPrediction, _MEASURES[measure][0]), getattr(RetrainRun, _MEASURES[measure][1])
    return ((predicted - actual) / func.nullif(actual, 0)).label(f"{measure}_relative_error")


def _hit(measure: str) -> Any:
    column = _MEASURES[measure][0]
    lower, upper = getattr(CostPrediction, f"{column}_lower"), getattr(CostPrediction, f"{column}_upper")
    actual = getattr(RetrainRun, _MEASURES[measure][1])
    return case(
        (lower.is_(None) | upper.is_(None) | actual.is_(None), None),
        (and_(actual >= lower, actual <= upper), 1),
        else_=0,
    ).label(f"{measure}_in_interval")


def _error_columns() -> list[Any]:
    """Per-run error, interval hit and whether the actual figures are a lower bound."""
    stopped = case((RetrainRun.status.in_(_STOPPED_STATUSES), 1), else_=0).label("stopped_before_cutoff")
    return [_relative_error(m_) for m_ in _MEASURES] + [_hit(m_) for m_ in _MEASURES] + [stopped]


def _measured_runs(model: str | None, since: datetime | None, until: datetime | None) -> Any:
    """The filter of the errors query: measured runs with the prediction their decision used."""
    rr, cp = RetrainRun, CostPrediction

    def filtered(query: Select) -> Select:
        query = (
            query.select_from(rr)
            .join(Decision, Decision.id == rr.decision_id)
            .join(cp, cp.id == Decision.cost_prediction_id)
            .where(rr.status.in_(_MEASURED_STATUSES), rr.energy_kwh.is_not(None))
        )
        return _runs_filtered(query, model, since, until)

    return filtered


def prediction_errors(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> AuditResult:
    """Predicted vs actual epochs, kWh and kg CO2e of each measured retrain, with interval hits.

    SELECT rr.id AS run_id, rr.started_at, m.name AS model, m.version, rr.status,
           cp.predicted_not_to_converge,
           cp.epochs AS predicted_epochs, cp.epochs_lower, cp.epochs_upper, rr.epochs AS actual_epochs,
           cp.energy_kwh AS predicted_kwh, cp.energy_kwh_lower, cp.energy_kwh_upper,
           rr.energy_kwh AS actual_kwh, (the same for emissions_kg as *_co2), cp.interval_level,
           (cp.energy_kwh - rr.energy_kwh) / NULLIF(rr.energy_kwh, 0) AS kwh_relative_error,
           CASE WHEN cp.energy_kwh_lower IS NULL OR cp.energy_kwh_upper IS NULL
                     OR rr.energy_kwh IS NULL THEN NULL
                WHEN rr.energy_kwh >= cp.energy_kwh_lower AND rr.energy_kwh <= cp.energy_kwh_upper
                THEN 1 ELSE 0 END AS kwh_in_interval,      (likewise for epochs and co2)
           CASE WHEN rr.status IN ('cap_reached', 'stopped_by_budget') THEN 1 ELSE 0 END
                AS stopped_before_cutoff
    FROM retrain_runs rr
    JOIN decisions d ON d.id = rr.decision_id
    JOIN cost_predictions cp ON cp.id = d.cost_prediction_id
    JOIN models m ON m.id = rr.model_id
    WHERE rr.status IN ('succeeded', 'cap_reached', 'stopped_by_budget') AND rr.energy_kwh IS NOT NULL
      AND rr.model_id IN (SELECT id FROM models WHERE name = :model)
      AND rr.started_at >= :since AND rr.started_at < :until
    ORDER BY rr.started_at, rr.id            -- newest :limit rows when limited

    A ``cap_reached`` or ``stopped_by_budget`` run stopped before the cutoff, so its actual
    epochs and cost are a lower bound of what reaching it would have needed; such rows are
    marked ``stopped_before_cutoff``. Totals, over every matching run (the same statement
    reduced to the error and hit columns, no limit): median absolute percentage error
    (MdAPE) and interval coverage per measure, over the runs that have both sides, and how
    many runs stopped before the cutoff.
    """
    rr, cp = RetrainRun, CostPrediction
    m = aliased(Model, name="m")
    filtered = _measured_runs(model, since, until)
    derived = _error_columns()
    query = filtered(
        select(
            rr.id.label("run_id"), rr.started_at, m.name.label("model"), m.version, rr.status,
            cp.predicted_not_to_converge,
            cp.epochs.label("predicted_epochs"), cp.epochs_lower, cp.epochs_upper,
            rr.epochs.label("actual_epochs"),
            cp.energy_kwh.label("predicted_kwh"), cp.energy_kwh_lower, cp.energy_kwh_upper,
            rr.energy_kwh.label("actual_kwh"),
            cp.emissions_kg.label("predicted_co2"), cp.emissions_kg_lower, cp.emissions_kg_upper,
            rr.emissions_kg.label("actual_co2"), cp.interval_level, *derived,
        )
    ).join(m, m.id == rr.model_id)
    runner = _Runner(session)
    rows = runner.rows(_newest(query, limit, "started_at", "run_id"))
    for row in rows:
        for key in _FLAGS:
            row[key] = None if row[key] is None else bool(row[key])
    if limit is None:
        totals = _error_totals(rows)  # every matching run is already here
    elif runner.connection.dialect.name == "postgresql":
        totals = _error_totals_in_sql(runner, filtered, derived)
    else:
        totals = _error_totals(runner.rows(filtered(select(*derived))))
    totals["shown"] = len(rows)
    columns = ["run_id", "started_at", "model", "version", "status", "stopped_before_cutoff", "predicted_epochs",
               "actual_epochs", "predicted_kwh", "energy_kwh_lower", "energy_kwh_upper", "actual_kwh",
               "kwh_relative_error", "kwh_in_interval", "predicted_co2", "actual_co2", "co2_in_interval"]
    return AuditResult("errors", columns, rows, totals, runner.sql, runner.parameters)


def _error_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """MdAPE (percent) and interval coverage per measure, from fetched error/hit columns."""
    totals: dict[str, Any] = {"runs": len(rows)}
    for measure in _MEASURES:
        errors = [abs(r[f"{measure}_relative_error"]) for r in rows if r[f"{measure}_relative_error"] is not None]
        hits = [bool(r[f"{measure}_in_interval"]) for r in rows if r[f"{measure}_in_interval"] is not None]
        totals[f"{measure}_mdape_pct"] = 100 * statistics.median(errors) if errors else None
        totals[f"{measure}_coverage"] = sum(hits) / len(hits) if hits else None
    totals["stopped_before_cutoff"] = sum(1 for r in rows if r["stopped_before_cutoff"])
    return totals


def _error_totals_in_sql(runner: _Runner, filtered: Any, derived: list[Any]) -> dict[str, Any]:
    """The same totals aggregated by PostgreSQL, so no per-run rows cross the wire.

    SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(kwh_relative_error)),
           avg(kwh_in_interval), ...  FROM (<errors statement, error and hit columns>) AS e

    ``percentile_cont(0.5)`` averages the two middle values, exactly as ``statistics.median``.
    """
    inner = filtered(select(*derived)).subquery("e")
    columns = [func.count().label("runs")]
    for measure in _MEASURES:
        error, hits = inner.c[f"{measure}_relative_error"], inner.c[f"{measure}_in_interval"]
        columns.append(func.percentile_cont(0.5).within_group(func.abs(error)).label(f"{measure}_mdape"))
        columns.append(func.avg(hits).label(f"{measure}_coverage"))
    columns.append(func.coalesce(func.sum(inner.c.stopped_before_cutoff), 0).label("stopped_before_cutoff"))
    row = runner.one(select(*columns))
    totals: dict[str, Any] = {"runs": int(row["runs"])}
    for measure in _MEASURES:
        mdape, coverage = row[f"{measure}_mdape"], row[f"{measure}_coverage"]
        totals[f"{measure}_mdape_pct"] = None if mdape is None else 100 * float(mdape)
        totals[f"{measure}_coverage"] = None if coverage is None else float(coverage)
    totals["stopped_before_cutoff"] = int(row["stopped_before_cutoff"])
    return totals


# --- decisions ----------------------------------------------------------------------------------


def decisions(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    skipped_for_budget: bool = False,
    action: str | None = None,
    limit: int | None = None,
) -> AuditResult:
    """Every decision with its reasons, newest first (optionally only those a budget blocked),
    and the calibration its forecast came from (``calibration_id``, as ``calibrations`` lists it).

    SELECT d.id AS decision_id, d.created_at, m.name AS model, m.version, d.batch_id,
           b.source_uri, d.action, d.blocked_by_budget, d.reasons, d.retry_after,
           cp.energy_kwh AS predicted_kwh, cp.energy_kwh_upper AS predicted_kwh_upper,
           cp.emissions_kg AS predicted_co2, cp.emissions_kg_upper AS predicted_co2_upper,
           cp.calibration_id
    FROM decisions d
    JOIN models m ON m.id = d.model_id
    JOIN batches b ON b.id = d.batch_id
    LEFT JOIN cost_predictions cp ON cp.id = d.cost_prediction_id
    WHERE d.model_id IN (SELECT id FROM models WHERE name = :model)
      AND d.created_at >= :since AND d.created_at < :until
      AND d.action <> 'retrain' AND d.blocked_by_budget IS true   -- --skipped-for-budget
      AND d.action = :action
    ORDER BY d.created_at DESC, d.id DESC
    LIMIT :limit

    Totals come from a second statement with the same filters and no limit:
    SELECT d.action, count(*) FROM decisions d WHERE <same filters> GROUP BY d.action
    """
    m = aliased(Model, name="m")
    cp = CostPrediction

    def filtered(query: Select) -> Select:
        if model is not None:
            query = query.where(Decision.model_id.in_(_model_ids(model)))
        if skipped_for_budget:
            query = query.where(Decision.action != "retrain", Decision.blocked_by_budget.is_(True))
        if action is not None:
            query = query.where(Decision.action == action)
        return _window(query, Decision.created_at, since, until)

    query = (
        filtered(
            select(
                Decision.id.label("decision_id"), Decision.created_at, m.name.label("model"), m.version,
                Decision.batch_id, Batch.source_uri, Decision.action, Decision.blocked_by_budget,
                Decision.reasons, Decision.retry_after, cp.energy_kwh.label("predicted_kwh"),
                cp.energy_kwh_upper.label("predicted_kwh_upper"), cp.emissions_kg.label("predicted_co2"),
                cp.emissions_kg_upper.label("predicted_co2_upper"), cp.calibration_id,
            ).select_from(Decision)
        )
        .join(m, m.id == Decision.model_id)
        .join(Batch, Batch.id == Decision.batch_id)
        .outerjoin(cp, cp.id == Decision.cost_prediction_id)
        .order_by(Decision.created_at.desc(), Decision.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    counts_query = filtered(select(Decision.action, func.count().label("n"))).group_by(Decision.action)
    runner = _Runner(session)
    rows = runner.rows(query)
    for row in rows:  # printed and exported: a secret in a batch URL stays out
        row["source_uri"] = redact_url(row["source_uri"])
    by_action = {row["action"]: int(row["n"]) for row in runner.rows(counts_query)}
    totals = {"decisions": sum(by_action.values()), "by_action": dict(sorted(by_action.items())),
              "shown": len(rows)}
    columns = ["decision_id", "created_at", "model", "version", "batch_id", "action",
               "blocked_by_budget", "reasons", "retry_after", "predicted_kwh_upper", "predicted_co2_upper"]
    return AuditResult("decisions", columns, rows, totals, runner.sql, runner.parameters)


# --- calibration history -------------------------------------------------------------------------


def calibrations(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> AuditResult:
    """Every cost-model version: architecture, version, source, points, leave-one-out error.

    With ``model``, the versions that model forecasts with: its own, and those stored for its
    architecture as a whole (no model); another model's are left out.

    SELECT c.id AS calibration_id, c.created_at, c.architecture, c.version, c.source,
           c.n_points, c.loo_error, c.interval_level, m.name AS model, c.parameters
    FROM calibrations c LEFT JOIN models m ON m.id = c.model_id
    WHERE (c.model_id IN (SELECT id FROM models WHERE name = :model)
           OR c.model_id IS NULL AND c.architecture IN (SELECT architecture FROM models WHERE name = :model))
      AND c.created_at >= :since AND c.created_at < :until
    ORDER BY c.architecture, c.version
    """
    m = aliased(Model, name="m")
    c = Calibration
    query = (
        select(
            c.id.label("calibration_id"), c.created_at, c.architecture, c.version, c.source,
            c.n_points, c.loo_error, c.interval_level, m.name.label("model"), c.parameters,
        )
        .outerjoin(m, m.id == c.model_id)
        .order_by(c.architecture, c.version)
    )
    if model is not None:
        architectures = select(Model.architecture).where(Model.name == model)
        query = query.where(or_(c.model_id.in_(_model_ids(model)), c.model_id.is_(None) & c.architecture.in_(architectures)))
    runner = _Runner(session)
    rows = runner.rows(_window(query, c.created_at, since, until))
    # Rows come by architecture, then version: the last one seen per architecture is its newest.
    # The labelled and the label-free cost models are two architectures here, with errors of their own.
    newest_error = {row["architecture"]: row["loo_error"] for row in rows if row["loo_error"] is not None}
    totals = {"versions": len(rows), "latest_loo_error": newest_error}
    columns = ["calibration_id", "created_at", "architecture", "version", "source", "n_points",
               "loo_error", "interval_level", "model"]
    return AuditResult("calibrations", columns, rows, totals, runner.sql, runner.parameters)


def run(session: Session, name: str, **filters: Any) -> AuditResult:
    """Run the audit query called ``name`` (one of ``QUERIES``) with its filters."""
    queries = {
        "cost": cost_history,
        "errors": prediction_errors,
        "decisions": decisions,
        "budget": budget_burn,
        "calibrations": calibrations,
    }
    return queries[name](session, **filters)
