"""Faults of the budget ledger: live runs keep their reservations, late and overrun spend is
recorded and counted once, budgets stay within what dates and the database hold.

Each test runs on SQLite and PostgreSQL (the ``db`` fixture) and failed before the fix.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert

from shiftcost.policy import PolicySettings, decide
from shiftcost.store import audit, runs
from shiftcost.store import repository as repo
from shiftcost.store.errors import BudgetError
from shiftcost.store.models import Budget, LedgerEntry, RetrainRun
from tests.store import seed

LEASE = timedelta(minutes=15)


def _decision_with_run(db, *, started_ago: timedelta, beat_ago: timedelta | None) -> tuple[int, int]:
    """A retrain decision with a ``running`` run started ``started_ago``, last heartbeat ``beat_ago``."""
    now = datetime.now(UTC)
    with db.session() as session:
        decision = seed.decision(session)
        run = repo.start_retrain_run(session, decision.model_id, decision_id=decision.id, batch_id=decision.batch_id)
        run.started_at = now - started_ago
        run.heartbeat_at = None if beat_ago is None else now - beat_ago
        return decision.id, run.id


def _kinds(db, decision_id: int) -> list[str]:
    with db.session(readonly=True) as session:
        return [e.kind for e in session.query(LedgerEntry).filter_by(decision_id=decision_id).order_by(LedgerEntry.id)]


# --- only runs proven dead are released ----------------------------------------------------------


def test_release_open_keeps_the_reservation_of_a_run_that_renews_its_heartbeat(db) -> None:
    seed.committed(db).create_budget("month", period="monthly", kwh_cap=10.0)
    live, _ = _decision_with_run(db, started_ago=timedelta(hours=5), beat_ago=timedelta(seconds=30))
    dead, _ = _decision_with_run(db, started_ago=timedelta(hours=5), beat_ago=timedelta(hours=2))
    never_started = seed.decisions(db, 1)[0]
    reserved_at = datetime.now(UTC) - timedelta(hours=3)
    for decision_id in (live, dead, never_started):
        seed.committed(db).reserve("month", 1.0, 0.1, decision_id, at=reserved_at)

    released = seed.committed(db).release_open(timedelta(hours=1), "crash", lease=LEASE)

    assert sorted(r.decision_id for r in released) == sorted([dead, never_started])
    assert _kinds(db, live) == ["reserve"]
    assert seed.committed(db).remaining("month", at=reserved_at).open_reservations == 1  # its period, even on the 1st


def test_the_watch_closes_a_run_by_its_heartbeat_not_its_age(db) -> None:
    from shiftcost import pipeline

    live, live_run = _decision_with_run(db, started_ago=timedelta(hours=9), beat_ago=timedelta(seconds=10))
    with db.session(readonly=True) as session:
        model_name = repo.get_model_by_id(session, session.get(RetrainRun, live_run).model_id).name
    assert pipeline.fail_stale_retrains(db, model_name, older_than_s=LEASE.total_seconds()) == []
    later = datetime.now(UTC) + timedelta(hours=1)
    (closed,) = pipeline.fail_stale_retrains(db, model_name, older_than_s=LEASE.total_seconds(), now=later)
    assert closed.run_id == live_run and closed.released == []  # it held no reservation


def test_a_heartbeat_renews_the_lease_while_the_block_runs(db) -> None:
    import time

    from shiftcost.pipeline.lease import heartbeat

    _, run_id = _decision_with_run(db, started_ago=timedelta(hours=1), beat_ago=timedelta(hours=1))
    with heartbeat(db, run_id, every_s=0.05):
        time.sleep(0.6)
    with db.session(readonly=True) as session:
        beat = session.get(RetrainRun, run_id).heartbeat_at
    assert datetime.now(UTC) - beat < timedelta(seconds=30)


def test_a_heartbeat_stores_the_progress_its_run_reported_and_forgets_it_after_the_block(db) -> None:
    import time

    from shiftcost.pipeline import lease

    _, run_id = _decision_with_run(db, started_ago=timedelta(hours=1), beat_ago=timedelta(hours=1))
    reported = lease.Progress(steps=120, epochs=1.5, spent_kwh=2.5e-4, spent_kg=1e-4)
    with lease.heartbeat(db, run_id, every_s=0.05):
        lease.report(run_id, reported)
        time.sleep(0.6)
    with db.session(readonly=True) as session:
        stored = session.get(RetrainRun, run_id).progress
    assert lease.Progress.from_dict(stored) == reported
    assert lease._reported(run_id) is None  # a later run of this id starts from nothing


def _dead_run_with_progress(db, progress: dict | None) -> tuple[int, int, str]:
    seed.committed(db).create_budget("month", period="monthly", kwh_cap=1.0, co2_cap=1.0)
    decision_id, run_id = _decision_with_run(db, started_ago=timedelta(hours=2), beat_ago=timedelta(hours=1))
    seed.committed(db).reserve("month", 0.2, 0.02, decision_id)
    with db.session() as session:
        run = session.get(RetrainRun, run_id)
        run.progress = progress
        model_name = repo.get_model_by_id(session, run.model_id).name
    return decision_id, run_id, model_name


def test_a_run_killed_outright_is_settled_at_the_priced_work_of_its_last_heartbeat(db) -> None:
    from shiftcost import pipeline

    decision_id, run_id, model_name = _dead_run_with_progress(
        db, {"steps": 40, "epochs": 0.75, "spent_kwh": 3e-3, "spent_kg": 1.2e-3}
    )
    (closed,) = pipeline.fail_stale_retrains(db, model_name, older_than_s=LEASE.total_seconds())

    assert closed.run_id == run_id and closed.settled and closed.released == []
    assert "after 40 steps (0.75 epochs) by its last heartbeat, 0.003 kWh" in closed.error
    assert _kinds(db, decision_id) == ["reserve", "settle"]
    status = seed.committed(db).remaining("month")
    assert status.remaining_kwh == pytest.approx(1.0 - 3e-3) and status.remaining_co2 == pytest.approx(1.0 - 1.2e-3)
    with db.session(readonly=True) as session:
        run = session.get(RetrainRun, run_id)
        assert (run.status, run.steps, run.epochs) == ("failed", 40, 0.75)
        assert (run.energy_kwh, run.emissions_kg, run.energy_method) == (3e-3, 1.2e-3, "priced")  # not measured
        # The audit of what runs cost adds up to what the ledger settled.
        assert audit.cost_history(session).totals["energy_kwh"] == pytest.approx(3e-3)
        # ... and the budget audit says that all of it was priced, none measured.
        (burn,) = audit.budget_burn(session).rows
        assert (burn["settled_kwh"], burn["priced_kwh"], burn["priced_co2"]) == pytest.approx((3e-3, 3e-3, 1.2e-3))
        # The energy rate is refitted from measured runs only: a priced one would echo the rate.
        architecture = repo.get_model_by_id(session, run.model_id).architecture
        assert runs.measured_run_details(session, architecture, except_run=-1) == []


def test_a_dead_run_with_no_price_for_its_work_releases_its_reservation(db) -> None:
    from shiftcost import pipeline

    decision_id, run_id, model_name = _dead_run_with_progress(db, {"steps": 40, "epochs": 0.75, "spent_kwh": None, "spent_kg": None})
    (closed,) = pipeline.fail_stale_retrains(db, model_name, older_than_s=LEASE.total_seconds())

    assert closed.released and closed.settled == [] and "after 40 steps" in closed.error
    assert _kinds(db, decision_id) == ["reserve", "release"]
    assert seed.committed(db).remaining("month").remaining_kwh == pytest.approx(1.0)


# --- late settlements and overruns ---------------------------------------------------------------


def test_a_run_finishing_after_its_release_records_a_late_settlement_the_budget_shows(db) -> None:
    seed.committed(db).create_budget("month", period="monthly", kwh_cap=1.0, co2_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("month", 0.2, 0.02, decision_id)
    seed.committed(db).release_open(timedelta(0), "released while it ran")
    assert seed.committed(db).remaining("month").remaining_kwh == pytest.approx(1.0)

    (late_id,) = seed.committed(db).settle_decision(decision_id, 9.08e-5 * 1000, 0.03)

    status = seed.committed(db).remaining("month")
    assert status.settled_kwh == pytest.approx(0.0908) and status.late_kwh == pytest.approx(0.0908)
    assert status.remaining_kwh == pytest.approx(1.0 - 0.0908)
    assert _kinds(db, decision_id) == ["reserve", "release", "settle"]
    assert seed.committed(db).settle_decision(decision_id, 1.0, 1.0) == []  # recorded once
    with db.session(readonly=True) as session:
        assert "late settlement" in session.get(LedgerEntry, late_id).reason


def test_overrun_beyond_the_reservation_is_recorded_shown_and_counted_in_what_is_left(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=1e-3)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("day", 4.13e-6, 0.0, decision_id)
    (entry_id,) = seed.committed(db).settle_decision(decision_id, 3.31e-5, 0.0)  # 8x the reservation

    status = seed.committed(db).remaining("day")
    assert status.overrun_kwh == pytest.approx(3.31e-5 - 4.13e-6)
    assert status.remaining_kwh == pytest.approx(1e-3 - 3.31e-5)
    with db.session(readonly=True) as session:
        assert session.get(LedgerEntry, entry_id).reason.startswith("overrun")
        (row,) = audit.budget_burn(session).rows
    assert row["overrun_kwh"] == pytest.approx(3.31e-5 - 4.13e-6)
    # The policy sees what the overrun left: 1e-3 - 3.31e-5 kWh, not 1e-3 - 4.13e-6.
    needs = 1e-3 - 2e-5
    prediction = {"kwh": needs, "kwh_upper": needs, "co2": 0.0, "co2_upper": 0.0, "predicted_not_to_converge": False}
    assert decide(prediction, [status], PolicySettings(), drift_verdict=True).action == "defer"


def test_audit_budget_totals_count_each_spend_once(db) -> None:
    for name, period in (("day", "daily"), ("month", "monthly")):
        seed.committed(db).create_budget(name, period=period, kwh_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve_many(["day", "month"], 0.001, 0.0, decision_id)
    seed.committed(db).settle_decision(decision_id, 0.000109926, 0.0)
    with db.session(readonly=True) as session:
        result = audit.budget_burn(session)
    assert [row["settled_kwh"] for row in result.rows] == pytest.approx([0.000109926] * 2)
    assert result.totals["settled_kwh"] == pytest.approx(0.000109926)


def test_audit_budget_totals_add_a_probes_spend_to_its_decisions_retrain(db) -> None:
    for name, period in (("day", "daily"), ("month", "monthly")):
        seed.committed(db).create_budget(name, period=period, kwh_cap=1.0, co2_cap=1.0)
    probed, plain = seed.decisions(db, 2)
    seed.committed(db).record_spend(["day", "month"], 0.01, 0.001, probed, "probe before deciding")
    seed.committed(db).reserve_many(["day", "month"], 0.2, 0.02, probed)
    seed.committed(db).settle_decision(probed, 0.08, 0.008)
    seed.committed(db).reserve_many(["day", "month"], 0.3, 0.03, plain)  # still open
    with db.session(readonly=True) as session:
        result = audit.budget_burn(session)
    assert [row["settled_kwh"] for row in result.rows] == pytest.approx([0.09] * 2)
    # Each decision once, however many budgets; the probe's spend and the retrain's both.
    totals = result.totals
    assert (totals["settled_kwh"], totals["settled_co2"], totals["reserved_kwh"]) == pytest.approx((0.09, 0.009, 0.3))


# --- budgets validated, changed, disabled, deleted -----------------------------------------------


def test_a_rolling_window_longer_than_dates_hold_is_refused(db) -> None:
    with pytest.raises(BudgetError, match="at most 36600"):
        seed.committed(db).create_budget("x", period="rolling_days", rolling_days=99_999_999, kwh_cap=1.0)
    assert seed.committed(db).list_budgets() == []


def test_a_bad_budget_written_behind_the_api_does_not_stop_the_status(db) -> None:
    with db.session() as session:
        session.execute(insert(Budget).values(name="old", scope="*", period="rolling_days", rolling_days=99_999_999,
                                              kwh_cap=1.0, created_at=datetime.now(UTC)))
    (status,) = seed.committed(db).budget_status()
    assert status.remaining_kwh == pytest.approx(1.0)


def test_update_disable_and_delete_keep_the_ledger_history(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=1.0)
    seed.committed(db).create_budget("unused", period="monthly", co2_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("day", 0.5, 0.0, decision_id)

    seed.committed(db).update_budget("day", kwh_cap=0.6, period="rolling_days", rolling_days=7)
    status = seed.committed(db).remaining("day")
    assert (status.period, status.kwh_cap, status.remaining_kwh) == ("rolling_days", 0.6, pytest.approx(0.1))
    with pytest.raises(BudgetError, match="rolling days apply only"):
        seed.committed(db).update_budget("day", period="daily", rolling_days=3)

    seed.committed(db).update_budget("day", enabled=False)
    assert [s.name for s in seed.committed(db).budget_status()] == ["unused"]  # no longer limits decisions
    assert seed.committed(db).remaining("day").disabled and _kinds(db, decision_id) == ["reserve"]

    with pytest.raises(BudgetError, match="disable it instead"):
        seed.committed(db).delete_budget("day")
    seed.committed(db).delete_budget("unused")
    assert [b.name for b in seed.committed(db).list_budgets()] == ["day"]


# --- the choices the report and the policy rest on -----------------------------------------------


def test_the_report_burn_down_gives_back_what_a_release_held(db) -> None:
    from shiftcost import report

    seed.committed(db).create_budget("month", period="monthly", kwh_cap=1.0)
    first, second = seed.decisions(db, 2)
    seed.committed(db).reserve("month", 0.4, 0.0, first)
    seed.committed(db).reserve("month", 0.3, 0.0, second)
    seed.committed(db).release_decision(first, "failed")
    seed.committed(db).settle_decision(second, 0.25, 0.0)
    with db.session(readonly=True) as session:
        series = report.burn_down(report.ledger_timeline(session))["month"]
    assert [(p["kind"], round(p["spent_kwh"], 9)) for p in series] == [
        ("reserve", 0.4), ("reserve", 0.7), ("release", 0.3), ("settle", 0.25)]
    assert series[-1]["spent_kwh"] == pytest.approx(seed.committed(db).remaining("month").spent_kwh)


def test_a_rolling_budget_never_sets_a_retry_time(db) -> None:
    seed.committed(db).create_budget("week", period="rolling_days", rolling_days=7, kwh_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("week", 0.9, 0.0, decision_id)
    status = seed.committed(db).remaining("week")
    assert status.window_end is not None  # a rolling window does end: a microsecond after now
    prediction = {"kwh": 0.5, "kwh_upper": 0.5, "co2": 0.0, "co2_upper": 0.0, "predicted_not_to_converge": False}
    decision = decide(prediction, [status], drift_verdict=True)
    assert decision.action == "defer" and decision.retry_after is None
    assert "waits for room." in decision.blocking_reasons[0].message


def test_a_measure_replaces_a_dead_runs_priced_settlement_but_never_the_probes_spend(db) -> None:
    from shiftcost.store import ledger

    seed.committed(db).create_budget("month", period="monthly", kwh_cap=1.0, co2_cap=1.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).record_spend(["month"], 0.01, 0.001, decision_id, "probe before deciding")
    seed.committed(db).reserve("month", 0.2, 0.02, decision_id)
    seed.committed(db).settle_decision(decision_id, 0.05, 0.005, note="retrain run 1 abandoned", priced=True)
    assert seed.committed(db).remaining("month").remaining_kwh == pytest.approx(1.0 - 0.01 - 0.05)
    with db.session(readonly=True) as session:
        settles = session.query(LedgerEntry).filter_by(decision_id=decision_id, kind="settle").order_by(LedgerEntry.id).all()
        assert [(e.priced, ledger.PRICED_NOT_MEASURED in e.reason) for e in settles] == [(False, False), (True, True)]

    with db.session(readonly=True) as session:
        assert audit.budget_burn(session).totals["priced_kwh"] == pytest.approx(0.05)

    replaced = seed.committed(db).settle_decision(decision_id, 0.08, 0.008, replaces_priced=True)

    assert len(replaced) == 1  # the priced settlement's, not the probe's
    assert _kinds(db, decision_id) == ["reserve", "settle", "reserve", "settle", "settle"]
    status = seed.committed(db).remaining("month")
    assert status.remaining_kwh == pytest.approx(1.0 - 0.01 - 0.08) and status.remaining_co2 == pytest.approx(1.0 - 0.001 - 0.008)
    assert seed.committed(db).settle_decision(decision_id, 0.09, 0.009, replaces_priced=True) == []  # replaced once
    with db.session(readonly=True) as session:
        (burn,) = audit.budget_burn(session).rows
    assert (burn["settled_kwh"], burn["priced_kwh"]) == pytest.approx((0.01 + 0.08, 0.0))  # the measure stands now


@pytest.mark.parametrize(
    "stored", [{"steps": "many"}, {"epochs": 1.0}, ["not", "a", "dict"], {"steps": 3, "epochs": 0.5, "spent_kwh": -1.0, "spent_kg": 0.1}]
)
def test_progress_that_is_not_one_releases_the_dead_run_and_the_watch_goes_on(db, stored) -> None:
    from shiftcost import pipeline

    decision_id, run_id, model_name = _dead_run_with_progress(db, stored)
    (closed,) = pipeline.fail_stale_retrains(db, model_name, older_than_s=LEASE.total_seconds())

    assert closed.run_id == run_id and closed.released and closed.settled == []
    assert _kinds(db, decision_id) == ["reserve", "release"]
