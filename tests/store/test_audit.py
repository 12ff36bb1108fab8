"""Audit queries against seeded history; expected figures come from the seed lists, not the database."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from shiftcost.store import audit
from shiftcost.store import repository as repo

from . import seed

T0 = datetime(2025, 1, 30, tzinfo=UTC)


@dataclass
class SeededRun:
    run_id: int
    model: str
    started_at: datetime
    status: str
    actual: tuple[float | None, float | None, float | None]  # epochs, kWh, kg CO2e
    predicted: tuple[float, float, float]
    lower: tuple[float, float, float]
    upper: tuple[float, float, float]


@dataclass
class SeededDecision:
    decision_id: int
    model: str
    created_at: datetime
    action: str
    blocked_by_budget: bool


@pytest.fixture
def history(db):
    """Two model names, retrain runs with predictions, decisions, calibrations; returns the seed lists."""
    rng = random.Random(11)
    runs: list[SeededRun] = []
    decisions: list[SeededDecision] = []
    with db.session() as session:
        models = {
            "digits": seed.model(session, name="digits", architecture="small-cnn"),
            "other": seed.model(session, name="other", architecture="resnet"),
        }
        for i in range(14):
            name = "digits" if i % 3 else "other"
            model = models[name]
            batch = seed.batch(session, model)
            at = T0 + timedelta(days=i * 3, hours=rng.randint(0, 23))
            index_run = repo.add_index_run(session, batch.id, model.id, 100, resque_dist=rng.random())
            predicted = tuple(round(rng.uniform(1, 10), 3) for _ in range(3))
            lower = tuple(p * 0.7 for p in predicted)
            upper = tuple(p * 1.3 for p in predicted)
            prediction = repo.add_cost_prediction(
                session, index_run.id, *predicted,
                epochs_lower=lower[0], epochs_upper=upper[0], energy_kwh_lower=lower[1],
                energy_kwh_upper=upper[1], emissions_kg_lower=lower[2], emissions_kg_upper=upper[2],
                interval_level=0.9,
            )
            action = "retrain" if i % 4 else rng.choice(["skip", "defer"])
            blocked = action != "retrain" and i % 8 == 0
            decision = repo.record_decision(session, batch.id, action, [f"reason {i}"],
                                            cost_prediction_id=prediction.id, blocked_by_budget=blocked)
            decision.created_at = at
            decisions.append(SeededDecision(decision.id, name, at, action, blocked))
            if action != "retrain":
                continue
            status = ["succeeded", "cap_reached", "failed", "succeeded", "running"][i % 5]
            actual: tuple[float | None, ...] = tuple(p * rng.uniform(0.5, 1.6) for p in predicted)
            if status in ("failed", "running"):
                actual = (None, None, None)
            run = repo.start_retrain_run(session, model.id, decision_id=decision.id, batch_id=batch.id,
                                         started_at=at + timedelta(minutes=5))
            if status != "running":
                repo.finish_retrain_run(session, run.id, status, epochs=actual[0], energy_kwh=actual[1],
                                        emissions_kg=actual[2])
            runs.append(SeededRun(run.id, name, run.started_at, status, actual, predicted, lower, upper))
        calibrations = []
        for j, (arch, days) in enumerate([("small-cnn", 1), ("small-cnn", 20), ("resnet", 25), ("small-cnn", 40)]):
            row = repo.add_calibration(session, arch, "sweep" if j == 0 else "refit", {"n": j}, {"a": j},
                                       n_points=5 + j, loo_error=0.1 * (j + 1), model_id=None)
            row.created_at = T0 + timedelta(days=days)
            calibrations.append((row.id, arch, row.created_at))
        # A third model of digits' architecture with a calibration of its own, which digits never uses.
        sibling = seed.model(session, name="sibling", architecture="small-cnn")
        row = repo.add_calibration(session, "small-cnn", "sweep", {}, {}, n_points=3, model_id=sibling.id)
        row.created_at = T0 + timedelta(days=30)
        calibrations.append((row.id, "small-cnn", row.created_at))
    return {"runs": runs, "decisions": decisions, "calibrations": calibrations}


def _query(db, name: str, **filters):
    with db.session(readonly=True) as session:
        return audit.run(session, name, **filters)


def test_cost_history_filters_and_totals(db, history) -> None:
    since, until = T0 + timedelta(days=5), T0 + timedelta(days=35)
    expected = [r for r in history["runs"] if r.model == "digits" and since <= r.started_at < until]
    assert expected, "seed must leave rows in the window"
    result = _query(db, "cost", model="digits", since=since, until=until)
    assert [row["run_id"] for row in result.rows] == [r.run_id for r in expected]
    assert [row["status"] for row in result.rows] == [r.status for r in expected]
    assert result.totals["runs"] == len(expected)
    assert result.totals["energy_kwh"] == pytest.approx(sum(r.actual[1] or 0 for r in expected))
    assert result.totals["emissions_kg"] == pytest.approx(sum(r.actual[2] or 0 for r in expected))
    assert result.totals["epochs"] == pytest.approx(sum(r.actual[0] or 0 for r in expected))
    assert {row["model"] for row in result.rows} == {"digits"}
    everything = _query(db, "cost")
    assert len(everything.rows) == len(history["runs"])


def test_prediction_errors_and_interval_hits(db, history) -> None:
    measured = [r for r in history["runs"] if r.status in ("succeeded", "cap_reached")]
    result = _query(db, "errors")
    assert [row["run_id"] for row in result.rows] == [r.run_id for r in measured]
    for row, run in zip(result.rows, measured, strict=True):
        assert row["kwh_relative_error"] == pytest.approx((run.predicted[1] - run.actual[1]) / run.actual[1])
        assert row["kwh_in_interval"] == (run.lower[1] <= run.actual[1] <= run.upper[1])
        assert row["co2_in_interval"] == (run.lower[2] <= run.actual[2] <= run.upper[2])

    def mdape(k: int) -> float:
        errors = sorted(abs(r.predicted[k] - r.actual[k]) / r.actual[k] for r in measured)
        middle = len(errors) // 2
        return 100 * (errors[middle] if len(errors) % 2 else (errors[middle - 1] + errors[middle]) / 2)

    hits = [r.lower[1] <= r.actual[1] <= r.upper[1] for r in measured]
    assert result.totals["kwh_mdape_pct"] == pytest.approx(mdape(1))
    assert result.totals["epochs_mdape_pct"] == pytest.approx(mdape(0))
    assert result.totals["kwh_coverage"] == pytest.approx(sum(hits) / len(hits))
    assert 0 < sum(hits) < len(hits), "seed should give both hits and misses"


def test_decisions_newest_first_and_budget_filter(db, history) -> None:
    result = _query(db, "decisions", model="digits")
    digits = sorted((d for d in history["decisions"] if d.model == "digits"),
                    key=lambda d: (d.created_at, d.decision_id), reverse=True)
    assert [row["decision_id"] for row in result.rows] == [d.decision_id for d in digits]
    counts: dict[str, int] = {}
    for d in digits:
        counts[d.action] = counts.get(d.action, 0) + 1
    assert result.totals["by_action"] == dict(sorted(counts.items()))

    blocked = _query(db, "decisions", skipped_for_budget=True)
    expected = {d.decision_id for d in history["decisions"] if d.blocked_by_budget and d.action != "retrain"}
    assert expected and {row["decision_id"] for row in blocked.rows} == expected
    assert all(row["reasons"] for row in blocked.rows)

    limited = _query(db, "decisions", limit=3)
    assert len(limited.rows) == 3 and limited.totals["decisions"] == len(history["decisions"])


def test_calibration_history_by_model_and_time(db, history) -> None:
    result = _query(db, "calibrations", model="digits")  # digits is a small-cnn
    sibling_id = history["calibrations"][-1][0]
    expected = [c for c in history["calibrations"] if c[1] == "small-cnn" and c[0] != sibling_id]
    assert [row["calibration_id"] for row in result.rows] == [c[0] for c in expected]
    assert [row["version"] for row in result.rows] == [1, 2, 3]  # version 4 is the sibling's
    sibling = _query(db, "calibrations", model="sibling")
    assert [(row["version"], row["model"]) for row in sibling.rows] == [(1, None), (2, None), (3, None), (4, "sibling")]
    # Each architecture's newest error (a label-free cost model is an architecture of its own here).
    assert _query(db, "calibrations").totals["latest_loo_error"] == pytest.approx({"resnet": 0.3, "small-cnn": 0.4})
    late = _query(db, "calibrations", since=T0 + timedelta(days=21))
    assert {row["calibration_id"] for row in late.rows} == {
        c[0] for c in history["calibrations"] if c[2] >= T0 + timedelta(days=21)}


def test_budget_burn_per_period(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=100.0)
    seed.committed(db).create_budget("month", period="monthly", kwh_cap=1000.0, co2_cap=50.0)
    seed.committed(db).create_budget("roll", period="rolling_days", rolling_days=2, kwh_cap=100.0)
    seed.committed(db).create_budget("run", period="per_run", kwh_cap=10.0, scope="digits")
    rng = random.Random(3)
    decision_ids = seed.decisions(db, 12)
    entries = []  # (decision, at, reserved kWh, outcome, measured kWh)
    for i, decision_id in enumerate(decision_ids):
        at = T0 + timedelta(hours=7 + 13 * i)  # crosses January -> February
        kwh, measured = round(rng.uniform(1, 5), 2), round(rng.uniform(1, 6), 2)
        outcome = ["open", "settle", "release"][i % 3]
        ids = seed.committed(db).reserve_many(["day", "month", "roll", "run"], kwh, 0.1, decision_id, at=at)
        for reservation in ids.values():
            if outcome == "settle":
                seed.committed(db).settle(reservation, measured, 0.2)
            elif outcome == "release":
                seed.committed(db).release(reservation, "failed")
        entries.append((decision_id, at, kwh, outcome, measured))

    def spent(selected) -> float:
        return sum(kwh if outcome == "open" else measured if outcome == "settle" else 0.0
                   for _, _, kwh, outcome, measured in selected)

    rows = _query(db, "budget").rows
    by_budget: dict[str, list[dict]] = {}
    for row in rows:
        by_budget.setdefault(row["budget"], []).append(row)

    days = sorted({at.date() for _, at, *_ in entries})
    assert [row["period"] for row in by_budget["day"]] == [d.isoformat() for d in days]
    for row, day in zip(by_budget["day"], days, strict=True):
        selected = [e for e in entries if e[1].date() == day]
        assert row["reservations"] == len(selected)
        assert row["remaining_kwh"] == pytest.approx(100.0 - spent(selected))
        assert row["open"] == sum(e[3] == "open" for e in selected)

    months = sorted({(at.year, at.month) for _, at, *_ in entries})
    assert [row["period"] for row in by_budget["month"]] == [f"{y:04d}-{m:02d}" for y, m in months]
    for row, (y, m) in zip(by_budget["month"], months, strict=True):
        selected = [e for e in entries if (e[1].year, e[1].month) == (y, m)]
        assert row["remaining_kwh"] == pytest.approx(1000.0 - spent(selected))
        settled_co2 = 0.2 * sum(e[3] == "settle" for e in selected)
        open_co2 = 0.1 * sum(e[3] == "open" for e in selected)
        assert row["remaining_co2"] == pytest.approx(50.0 - settled_co2 - open_co2)

    for row in by_budget["roll"]:
        end = row["period_end"]
        selected = [e for e in entries if end - timedelta(days=2) <= e[1] < end]
        assert row["remaining_kwh"] == pytest.approx(100.0 - spent(selected))

    # per_run: one row per day; remaining is the headroom of that day's costliest run.
    assert [row["period"] for row in by_budget["run"]] == [d.isoformat() for d in days]
    for row, day in zip(by_budget["run"], days, strict=True):
        costliest = max(spent([e]) for e in entries if e[1].date() == day)
        assert row["remaining_kwh"] == pytest.approx(10.0 - costliest)

    scoped = _query(db, "budget", model="other").rows
    assert "run" not in {row["budget"] for row in scoped}
    since = T0 + timedelta(days=3)
    windowed = _query(db, "budget", budget="day", since=since).rows
    assert [row["period"] for row in windowed] == [d.isoformat() for d in days if d >= since.date()]


def test_filters_are_bound_parameters(db, history) -> None:
    hostile = "digits' OR '1'='1"
    result = _query(db, "cost", model=hostile)
    assert result.rows == []
    assert hostile not in result.sql[0]


def _run_as_printed(connection, statement: str, bound: list[tuple[str, object]]) -> list:
    """``statement`` run as `--show-sql` prints it, with its bound values handed to the driver."""
    values = [(name, value.value if isinstance(value, enum.Enum) else value) for name, value in bound]
    if connection.dialect.positional:
        assert statement.count("?") == len(values)
        return connection.exec_driver_sql(statement, tuple(value for _, value in values)).all()
    return connection.exec_driver_sql(statement, dict(values)).all()


@pytest.mark.parametrize("name", ["cost", "errors", "decisions", "calibrations"])
def test_each_statement_run_with_its_bound_values_gives_what_the_audit_read(db, history, name) -> None:
    result = _query(db, name, model="digits")
    with db.engine.connect() as connection:
        rows, *totals = (_run_as_printed(connection, *statement) for statement in zip(result.sql, result.parameters, strict=True))
    assert len(rows) == len(result.rows) > 0  # the first statement reads the rows; the others, totals, run too


def test_the_budget_audits_statements_run_with_their_bound_values(db, history) -> None:
    seed.committed(db).create_budget("month", period="monthly", kwh_cap=5.0)
    seed.committed(db).create_budget("day", period="daily", kwh_cap=5.0)
    seed.committed(db).reserve_many(["day", "month"], 1.0, 0.1, history["decisions"][0].decision_id)
    result = _query(db, "budget", since=T0)
    with db.engine.connect() as connection:
        budgets, days, spend = (_run_as_printed(connection, *statement) for statement in zip(result.sql, result.parameters, strict=True))
    assert [row[1] for row in budgets] == ["day", "month"] and len(days) == 2 and len(spend) == 1


def test_limits_keep_the_newest_rows_and_totals_cover_all(db, history) -> None:
    runs = sorted(history["runs"], key=lambda r: (r.started_at, r.run_id))
    limited = _query(db, "cost", limit=3)
    assert [row["run_id"] for row in limited.rows] == [r.run_id for r in runs[-3:]]
    assert limited.totals["runs"] == len(runs) and limited.totals["shown"] == 3
    assert limited.totals["energy_kwh"] == pytest.approx(sum(r.actual[1] or 0 for r in runs))

    full, few = _query(db, "errors"), _query(db, "errors", limit=2)
    assert [row["run_id"] for row in few.rows] == [row["run_id"] for row in full.rows[-2:]]
    for key in ("runs", "kwh_mdape_pct", "kwh_coverage", "co2_coverage", "epochs_mdape_pct"):
        assert few.totals[key] == pytest.approx(full.totals[key])


def test_runs_stopped_by_the_budget_guard_are_audited_as_lower_bounds(db) -> None:
    """A run the budget guard stopped spent measured energy short of the cutoff: the errors audit
    keeps it, marked as stopped, since its actual epochs are a lower bound of what it needed."""
    measured = {  # status: (predicted, actual) epochs, kWh, kg CO2e
        "succeeded": ((4.0, 2.0, 1.0), (5.0, 2.5, 1.2)),
        "stopped_by_budget": ((6.0, 3.0, 1.5), (2.0, 1.0, 0.5)),
        "cap_reached": ((3.0, 1.5, 0.7), (3.0, 1.4, 0.8)),
    }
    runs = {}
    with db.session() as session:
        model = seed.model(session)
        for i, (status, (predicted, actual)) in enumerate(measured.items()):
            batch = seed.batch(session, model)
            index_run = repo.add_index_run(session, batch.id, model.id, 100)
            prediction = repo.add_cost_prediction(
                session, index_run.id, *predicted, energy_kwh_lower=predicted[1] * 0.8,
                energy_kwh_upper=predicted[1] * 1.2, interval_level=0.9,
            )
            decision = repo.record_decision(session, batch.id, "retrain", ["drift"], cost_prediction_id=prediction.id)
            run = repo.start_retrain_run(session, model.id, decision_id=decision.id, batch_id=batch.id,
                                         started_at=T0 + timedelta(hours=i))
            repo.finish_retrain_run(session, run.id, status, epochs=actual[0], energy_kwh=actual[1],
                                    emissions_kg=actual[2])
            runs[status] = run.id

    full = _query(db, "errors")
    assert [row["run_id"] for row in full.rows] == list(runs.values())
    by_status = {row["status"]: row for row in full.rows}
    assert by_status["stopped_by_budget"]["stopped_before_cutoff"] is True
    assert by_status["cap_reached"]["stopped_before_cutoff"] is True
    assert by_status["succeeded"]["stopped_before_cutoff"] is False
    assert by_status["stopped_by_budget"]["actual_epochs"] == pytest.approx(2.0)
    assert by_status["stopped_by_budget"]["kwh_relative_error"] == pytest.approx((3.0 - 1.0) / 1.0)
    assert by_status["stopped_by_budget"]["kwh_in_interval"] is False
    errors = sorted(abs(p[1] - a[1]) / a[1] for p, a in measured.values())
    assert full.totals["runs"] == 3 and full.totals["stopped_before_cutoff"] == 2
    assert full.totals["kwh_mdape_pct"] == pytest.approx(100 * errors[1])
    # Limited, the totals come from their own statement (aggregated in SQL on PostgreSQL).
    newest = _query(db, "errors", limit=1)
    assert [row["run_id"] for row in newest.rows] == [runs["cap_reached"]]
    assert newest.totals["runs"] == 3 and newest.totals["stopped_before_cutoff"] == 2
    assert newest.totals["kwh_mdape_pct"] == pytest.approx(full.totals["kwh_mdape_pct"])
