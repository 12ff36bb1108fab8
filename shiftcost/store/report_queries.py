"""Read-only queries behind the HTML report: the per-batch overview and the ledger timeline.

The SQL each one runs is in its docstring; the audit queries the report also shows live in
:mod:`shiftcost.store.audit`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from shiftcost.features import SHIFT_FEATURES
from shiftcost.store.audit_common import _window

__all__ = ["DEFAULT_LIMIT", "OVERALL_FEATURE_SET", "batch_overview", "ledger_timeline", "short_name"]

DEFAULT_LIMIT = 1000
#: The drift report row that holds a batch's overall verdict (the others are per test group).
OVERALL_FEATURE_SET = "overall"


def batch_overview(
    session: Session,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = DEFAULT_LIMIT,
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
    rows = _rows(session, _overview_query(model, since, until, limit))
    for row in rows:
        row["name"] = short_name(row["source_uri"])
        row["drift"] = _drift_of(row)
    return rows


def _newest_id(table: Any, key: str, value: Any, **equal: Any) -> Any:
    """``(SELECT max(id) FROM table WHERE key = value AND ...)``, the newest row of a batch."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    # An alias of its own, so the subquery never correlates with the outer join.
    inner = aliased(table)
    conditions = [getattr(inner, key) == value, *(getattr(inner, name) == v for name, v in equal.items())]
    return select(func.max(inner.id)).where(*conditions).correlate_except(inner).scalar_subquery()


def _drift_columns(batch_id: Any) -> list[Any]:
    """How many drift tests a batch has, how many drifted, and its stored overall verdict."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    from shiftcost.store.models import DriftReport

    dr = aliased(DriftReport, name="dr")
    tests = select(func.count()).select_from(dr).where(dr.batch_id == batch_id).scalar_subquery()
    drifted = (
        select(func.count()).select_from(dr).where(dr.batch_id == batch_id, dr.drift_detected.is_(True)).scalar_subquery()
    )
    overall = aliased(DriftReport, name="overall")
    verdict = (
        select(overall.drift_detected)
        .where(overall.id == _newest_id(DriftReport, "batch_id", batch_id, feature_set=OVERALL_FEATURE_SET))
        .scalar_subquery()
    )
    return [tests.label("drift_tests"), drifted.label("drift_detected_tests"), verdict.label("drift_verdict")]


def _overview_query(model: str | None, since: datetime | None, until: datetime | None, limit: int | None) -> Any:
    """The statement in :func:`batch_overview`'s docstring."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    from shiftcost.store.models import Batch, CostPrediction, Decision, IndexRun, Model, RetrainRun

    b = Batch
    ir, d, cp, rr = IndexRun, Decision, CostPrediction, RetrainRun
    m = aliased(Model, name="m")
    prediction_id = func.coalesce(d.cost_prediction_id, _newest_id(CostPrediction, "index_run_id", ir.id))
    query = (
        select(
            b.id.label("batch_id"), b.source_uri, b.registered_at, b.status, b.failure_reason, b.samples,
            m.version.label("model_version"),
            *(getattr(ir, column) for column in SHIFT_FEATURES), ir.accuracy, *_drift_columns(b.id),
            d.id.label("decision_id"), d.action, d.blocked_by_budget, d.reasons,
            cp.epochs.label("predicted_epochs"), cp.energy_kwh.label("predicted_kwh"),
            cp.energy_kwh_lower.label("predicted_kwh_lower"), cp.energy_kwh_upper.label("predicted_kwh_upper"),
            cp.emissions_kg.label("predicted_co2"), cp.emissions_kg_upper.label("predicted_co2_upper"),
            cp.interval_level, rr.id.label("run_id"), rr.status.label("run_status"),
            rr.epochs.label("actual_epochs"), rr.energy_kwh.label("actual_kwh"), rr.emissions_kg.label("actual_co2"),
        )
        .select_from(b)
        .join(m, m.id == b.model_id)
        .outerjoin(ir, ir.id == _newest_id(IndexRun, "batch_id", b.id))
        .outerjoin(d, d.id == _newest_id(Decision, "batch_id", b.id))
        .outerjoin(cp, cp.id == prediction_id)
        .outerjoin(rr, rr.id == _newest_id(RetrainRun, "batch_id", b.id))
    )
    if model is not None:
        query = query.where(b.model_name == model)
    query = _window(query, b.registered_at, since, until)
    if limit is None:
        return query.order_by(b.registered_at, b.id)
    newest = query.order_by(b.registered_at.desc(), b.id.desc()).limit(limit).subquery()
    return select(newest).order_by(newest.c.registered_at, newest.c.batch_id)


def _drift_of(row: dict[str, Any]) -> bool | None:
    """The stored overall verdict; else whether any test drifted; else what the decision's reasons say."""
    if row["drift_verdict"] is not None:
        return bool(row["drift_verdict"])
    if int(row["drift_tests"] or 0) > 0:
        return bool(row["drift_detected_tests"])
    if row["reasons"]:
        # Without stored tests, the decision still says whether drift was seen.
        codes = {reason.get("code") for reason in row["reasons"] if isinstance(reason, dict)}
        return True if "drift_detected" in codes else False if "no_drift" in codes else None
    return None


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


def _rows(session: Session, query: Any) -> list[dict[str, Any]]:
    result = session.execute(query)
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result]


def short_name(uri: str | None) -> str:
    """The last path component of a batch URI (``04-gaussian_noise-0.2.npz``), secrets masked."""
    from shiftcost.redaction import redact_url

    if not uri:
        return ""
    uri = redact_url(uri)
    return PurePosixPath(uri.rstrip("/").replace("\\", "/")).name or uri
