"""What an assessment writes: drift reports, the index run, the cost prediction, the decision
and its budget reservation, with the batch's new status, in the caller's one transaction.

The pipeline's objects (drift result, cost estimate, policy decision) are read by their
attributes only, so this module needs neither the pipeline nor the libraries behind it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shiftcost.jsonsafe import json_safe
from shiftcost.statuses import DecisionAction
from shiftcost.store import ledger, repository
from shiftcost.store.batches import guarded_update
from shiftcost.store.ledger import BudgetStatus
from shiftcost.store.models import Budget, IndexRun
from shiftcost.store.records import Claim

__all__ = ["add_cost_prediction", "add_drift_reports", "get_index_run", "lock_budgets", "record_assessment"]


def lock_budgets(session: Session, model_name: str) -> list[BudgetStatus]:
    """Lock the budgets that apply to the model and return their status under the lock.

    ``SELECT ... FOR UPDATE`` on PostgreSQL, in name order as the ledger locks them; on
    SQLite the session's write lock is held already. The decision taken on this status is
    then checked by its reservation against the same figures.
    """
    query = select(Budget.id).where(Budget.scope.in_([model_name, "*"])).order_by(Budget.name).with_for_update()
    session.execute(query).all()
    return ledger.budget_status(session, model_name)


def record_assessment(
    session: Session,
    claim: Claim,
    *,
    batch_values: Mapping[str, Any],
    drift: Any,
    drift_html: str,
    index_run: Mapping[str, Any],
    estimate: Any,
    decision: Any,
    budgets: Sequence[BudgetStatus],
) -> int:
    """Write one assessment; returns the decision's id.

    ``batch_values`` (status and the batch's columns) move the claimed batch on, or
    ``ClaimLost`` is raised before anything else is written. ``index_run`` holds
    ``add_index_run``'s arguments after the batch id. A ``retrain`` decision reserves its
    kWh / kg CO2e on every budget in ``budgets``; a probe the estimate ran is charged after
    the reservation (it is spent already, so it never blocks the run it informed).
    """
    guarded_update(session, claim, **batch_values)
    add_drift_reports(session, claim.batch_id, drift, drift_html)
    index_row = repository.add_index_run(session, claim.batch_id, **index_run)
    prediction_id = add_cost_prediction(session, index_row.id, estimate)
    policy = {key: value for key, value in decision.to_dict().items() if key not in ("reasons", "budget_state")}
    row = repository.record_decision(
        session,
        claim.batch_id,
        decision.action,
        [reason.to_dict() for reason in decision.reasons],
        cost_prediction_id=prediction_id,
        blocked_by_budget=decision.blocked_by_budget,
        budget_state=json_safe(list(decision.budget_state)),
        policy=json_safe(policy),
        retry_after=decision.retry_after,
    )
    names = [budget.name for budget in budgets]
    if decision.action == DecisionAction.RETRAIN and names:
        ledger.reserve_many(session, names, _reservable(decision.kwh), _reservable(decision.co2), row.id)
    spend = None if estimate is None else estimate.probe_spend
    if spend is not None and names:
        steps = estimate.probe["cost"]["steps"]
        ledger.record_spend(session, names, *spend, row.id, f"forecast probe of {steps} steps before the decision")
    return row.id


def add_drift_reports(session: Session, batch_id: int, result: Any, html_uri: str) -> None:
    """One row per drift test group of ``result`` (a ``shiftcost.drift.DriftResult``) and one
    ``overall`` row with the verdict of its rule."""
    thresholds = json_safe(result.thresholds) | {"rule": result.rule, "verdict": result.verdict, "seed": result.seed}
    for group in result.groups:
        repository.add_drift_report(
            session, batch_id, group.method, group.name, group.drifted,
            score=group.score, threshold=group.threshold, thresholds=thresholds,
            details=json_safe(group.to_dict()), html_uri=str(html_uri),
        )  # fmt: skip
    drifted = len(result.drifted_groups)
    repository.add_drift_report(
        session, batch_id, result.rule, "overall", result.verdict,
        score=float(drifted), threshold=float(result.thresholds.get("min_drifted_groups", 1)), thresholds=thresholds,
        details={"drifted_groups": drifted, "evidently_version": result.evidently_version, "seconds": result.seconds},
        html_uri=str(html_uri),
    )  # fmt: skip


def add_cost_prediction(session: Session, index_run_id: int, estimate: Any) -> int | None:
    """Store the estimate's prediction (a ``pipeline.assess.CostEstimate``); its id, or None
    when there is no prediction with energy and emissions to store."""
    if estimate is None or estimate.prediction is None:
        return None
    p = estimate.prediction
    if p.energy_kwh is None or p.emissions_kg is None:
        return None
    details = {
        "prediction": p.to_dict(),
        "cost_model_version": estimate.cost_model_version,
        "energy_probe_id": estimate.energy_probe_id,
        "stage": estimate.stage,
        "probe_advice": estimate.probe_advice,
        "probe": estimate.probe,
        "unbounded_upper": not all(map(math.isfinite, (p.epochs_upper, p.energy_kwh_upper or 0.0))),
    }
    row = repository.add_cost_prediction(
        session, index_run_id, p.epochs, p.energy_kwh, p.emissions_kg,
        epochs_lower=_finite(p.epochs_lower), epochs_upper=_finite(p.epochs_upper),
        energy_kwh_lower=_finite(p.energy_kwh_lower), energy_kwh_upper=_finite(p.energy_kwh_upper),
        emissions_kg_lower=_finite(p.emissions_kg_lower), emissions_kg_upper=_finite(p.emissions_kg_upper),
        interval_level=p.level, predicted_not_to_converge=p.predicted_not_to_converge,
        joules_per_sample_epoch=estimate.joules_per_sample_epoch, carbon_intensity=estimate.carbon_intensity,
        samples=estimate.samples, calibration_id=estimate.calibration_id, details=json_safe(details),
    )  # fmt: skip
    return row.id


def get_index_run(session: Session, index_run_id: int) -> IndexRun | None:
    """An index run by id, if it exists."""
    return session.get(IndexRun, index_run_id)


def _finite(value: float | None) -> float | None:
    """Non-finite bounds (too few calibration runs for a finite interval) are stored as unknown."""
    return value if value is not None and math.isfinite(value) else None


def _reservable(amount: float | None) -> float:
    return 0.0 if amount is None else float(amount)
