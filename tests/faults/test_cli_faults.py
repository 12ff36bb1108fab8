"""Bad input at the command line: one sentence (a ``ShiftcostError``), exit code 2, nothing written."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.errors import ShiftcostError
from tests.store import seed

runner = CliRunner()


def invoke(*args: str, url: str):
    return runner.invoke(app, [*args, "--database-url", url], catch_exceptions=True)


def one_sentence(result, *words: str) -> str:
    """The refusal's message, checked to be a user error of one line naming ``words``."""
    assert isinstance(result.exception, ShiftcostError), result.exception
    assert result.exception.exit_code == 2
    message = str(result.exception)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def test_a_rolling_window_of_99999999_days_is_refused_and_the_pipeline_goes_on(database_url: str, db) -> None:
    refused = invoke("budget", "create", "x", "--period", "rolling_days", "--rolling-days", "99999999", "--kwh", "1",
                     url=database_url)
    one_sentence(refused, "--rolling-days 99999999")
    assert seed.committed(db).list_budgets() == []
    listed = invoke("budget", "list", "--json", url=database_url)
    assert listed.exit_code == 0 and json.loads(listed.output) == []


@pytest.mark.parametrize(
    "args",
    [
        ("audit", "budget", "--since", "0001-01-01T00:00+01:00"),
        ("audit", "cost", "--since", "999999999d"),
        ("audit", "decisions", "--until", "99999999999w"),
        ("budget", "release-open", "--older-than", "99999999999d"),
    ],
)
def test_out_of_range_times_are_one_sentence(database_url: str, args) -> None:
    one_sentence(invoke(*args, url=database_url), args[-1])


def test_budget_update_disable_enable_delete(database_url: str, db) -> None:
    assert invoke("budget", "create", "day", "--period", "daily", "--kwh", "5", url=database_url).exit_code == 0
    updated = invoke("budget", "update", "day", "--kwh", "7", "--co2", "1", "--json", url=database_url)
    assert updated.exit_code == 0, updated.output
    assert json.loads(updated.output) | {"id": 0} == {"id": 0, "name": "day", "scope": "*", "period": "daily",
                                                      "rolling_days": None, "kwh_cap": 7.0, "co2_cap": 1.0,
                                                      "enabled": True}
    one_sentence(invoke("budget", "update", "day", "--no-kwh", "--no-co2", url=database_url), "needs a kWh cap")
    one_sentence(invoke("budget", "update", "nope", "--kwh", "1", url=database_url), "nope")

    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve("day", 1.0, 0.1, decision_id)
    disabled = invoke("budget", "disable", "day", "--json", url=database_url)
    assert disabled.exit_code == 0 and json.loads(disabled.output)["enabled"] is False
    assert seed.committed(db).budget_status() == []
    one_sentence(invoke("budget", "delete", "day", url=database_url), "disable it instead")
    assert invoke("budget", "enable", "day", url=database_url).exit_code == 0
    assert [s.name for s in seed.committed(db).budget_status()] == ["day"]

    assert invoke("budget", "create", "spare", "--period", "monthly", "--co2", "1", url=database_url).exit_code == 0
    assert invoke("budget", "delete", "spare", url=database_url).exit_code == 0
    assert [b.name for b in seed.committed(db).list_budgets()] == ["day"]


def test_release_open_leaves_a_live_run_alone(database_url: str, db) -> None:
    from shiftcost.store import repository as repo
    from shiftcost.store.models import RetrainRun

    seed.committed(db).create_budget("day", period="daily", kwh_cap=5.0)
    with db.session() as session:
        decision = seed.decision(session)
        run = repo.start_retrain_run(session, decision.model_id, decision_id=decision.id)
        run.started_at = datetime.now(UTC) - timedelta(hours=3)
        run.heartbeat_at = datetime.now(UTC)
        decision_id, run_id = decision.id, run.id
    seed.committed(db).reserve("day", 2.0, 0.5, decision_id, at=datetime.now(UTC) - timedelta(hours=2))
    kept = json.loads(invoke("budget", "release-open", "--older-than", "1h", "--json", url=database_url).output)
    assert kept["reservations"] == [] and len(seed.committed(db).open_reservations()) == 1
    with db.session() as session:
        session.get(RetrainRun, run_id).heartbeat_at = datetime.now(UTC) - timedelta(hours=1)
    released = json.loads(invoke("budget", "release-open", "--older-than", "1h", "--json", url=database_url).output)
    assert [r["decision_id"] for r in released["reservations"]] == [decision_id]


# Fixed at import: a test's budget figures are read at this time too, so that a daily budget's
# period is the reservations' own even when the test runs just after midnight.
_AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def _run_dead_for_an_hour(db, progress: dict) -> tuple[int, int]:
    """A decision whose retrain run last beat an hour ago with ``progress``: (decision id, run id)."""
    from shiftcost.store import repository as repo

    with db.session() as session:
        decision = seed.decision(session)
        run = repo.start_retrain_run(session, decision.model_id, decision_id=decision.id, batch_id=decision.batch_id)
        run.started_at = run.heartbeat_at = _AN_HOUR_AGO
        run.progress = progress
        session.flush()
        return decision.id, run.id


def test_release_open_settles_a_dead_run_at_its_priced_work_and_releases_a_decision_that_never_ran(database_url: str, db) -> None:
    from shiftcost.store.models import LedgerEntry, RetrainRun

    seed.committed(db).create_budget("day", period="daily", kwh_cap=5.0, co2_cap=5.0)
    dead, run_id = _run_dead_for_an_hour(db, {"steps": 30, "epochs": 0.5, "spent_kwh": 0.25, "spent_kg": 0.1})
    (never_ran,) = seed.decisions(db, 1)
    for decision_id in (dead, never_ran):
        seed.committed(db).reserve("day", 2.0, 0.5, decision_id, at=_AN_HOUR_AGO)

    dry = json.loads(invoke("budget", "release-open", "--older-than", "0", "--dry-run", "--json", url=database_url).output)
    assert [(r["decision_id"], r["kwh"], r["co2"], r["steps"]) for r in dry["settled"]] == [(dead, 0.25, 0.1, 30)]
    assert [r["decision_id"] for r in dry["reservations"]] == [never_ran]
    assert len(seed.committed(db).open_reservations()) == 2  # a dry run changes nothing

    done = json.loads(invoke("budget", "release-open", "--older-than", "0", "--json", url=database_url).output)
    assert done["settled"] == dry["settled"] and done["reservations"] == dry["reservations"]
    with db.session(readonly=True) as session:
        kinds = {d: [e.kind for e in session.query(LedgerEntry).filter_by(decision_id=d).order_by(LedgerEntry.id)] for d in (dead, never_ran)}
        run = session.get(RetrainRun, run_id)
        assert (run.status, run.steps, run.energy_kwh, run.energy_method) == ("failed", 30, 0.25, "priced")
    assert kinds == {dead: ["reserve", "settle"], never_ran: ["reserve", "release"]}
    assert seed.committed(db).remaining("day", at=_AN_HOUR_AGO).remaining_kwh == pytest.approx(5.0 - 0.25)
    (listed,) = json.loads(invoke("budget", "list", "--json", url=database_url).output)
    if listed["window_start"] <= _AN_HOUR_AGO.isoformat():  # today's period holds the reservations (not just after midnight)
        assert (listed["settled_kwh"], listed["priced_kwh"], listed["priced_co2"]) == pytest.approx((0.25, 0.25, 0.1))


def test_release_open_on_one_budget_settles_a_dead_run_on_every_budget_it_reserved_on_and_lists_each(database_url: str, db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=5.0)
    seed.committed(db).create_budget("carbon", period="monthly", co2_cap=5.0)
    dead, _ = _run_dead_for_an_hour(db, {"steps": 12, "epochs": 0.2, "spent_kwh": 0.25, "spent_kg": 0.1})
    (only_carbon,) = seed.decisions(db, 1)
    for budget in ("day", "carbon"):
        seed.committed(db).reserve(budget, 2.0, 0.5, dead, at=_AN_HOUR_AGO)
    seed.committed(db).reserve("carbon", 1.0, 0.4, only_carbon, at=_AN_HOUR_AGO)

    args = ("budget", "release-open", "--budget", "day", "--older-than", "0", "--json")
    dry = json.loads(invoke(*args, "--dry-run", url=database_url).output)
    done = json.loads(invoke(*args, url=database_url).output)

    for listing in (dry, done):
        assert sorted((r["budget"], r["decision_id"], r["kwh"]) for r in listing["settled"]) == [("carbon", dead, 0.25), ("day", dead, 0.25)]
        assert listing["reservations"] == []
    assert [r.decision_id for r in seed.committed(db).open_reservations()] == [only_carbon]  # another budget's, not asked for
    assert seed.committed(db).remaining("carbon", at=_AN_HOUR_AGO).remaining_co2 == pytest.approx(5.0 - 0.1 - 0.4)
