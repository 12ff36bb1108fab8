"""``shiftcost db``, ``budget`` and ``audit`` commands, through Typer's runner and one real process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.store import migrate
from shiftcost.store import repository as repo

from . import seed

runner = CliRunner()


def invoke(*args: str, url: str | None = None):
    extra = ["--database-url", url] if url else []
    return runner.invoke(app, [*args, *extra], catch_exceptions=True)


def test_db_upgrade_current_downgrade(empty_database_url: str) -> None:
    current = invoke("db", "current", "--json", url=empty_database_url)
    assert current.exit_code == 0, current.output
    assert json.loads(current.output)["current"] == [] and not json.loads(current.output)["up_to_date"]

    upgraded = invoke("db", "upgrade", "--json", url=empty_database_url)
    assert upgraded.exit_code == 0, upgraded.output
    assert json.loads(upgraded.output)["after"] == list(migrate.head_revisions())

    refused = invoke("db", "downgrade", "base", url=empty_database_url)
    assert refused.exit_code != 0 and "--yes" in str(refused.exception)
    assert migrate.current_revisions(empty_database_url) == migrate.head_revisions()

    downgraded = invoke("db", "downgrade", "base", "--yes", url=empty_database_url)
    assert downgraded.exit_code == 0, downgraded.output
    assert migrate.current_revisions(empty_database_url) == ()


def test_db_current_of_a_sqlite_url_naming_no_file_says_so_and_leaves_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet.db"
    shown = invoke("db", "current", url=f"sqlite:///{missing}")
    assert shown.exit_code == 0, shown.output
    said = "revision none (head " + ", ".join(migrate.head_revisions()) + ") - no database file yet: `shiftcost db upgrade` creates it"
    # The console may fold the line (and the long path in it) at its width.
    assert "".join(shown.output.split()).endswith("".join(said.split())), shown.output
    assert not missing.exists()
    assert invoke("db", "upgrade", url=f"sqlite:///{missing}").exit_code == 0
    assert json.loads(invoke("db", "current", "--json", url=f"sqlite:///{missing}").output)["up_to_date"]


def test_budget_commands(database_url: str, db) -> None:
    created = invoke("budget", "create", "day", "--period", "daily", "--kwh", "5", "--co2", "2", "--json",
                     url=database_url)
    assert created.exit_code == 0, created.output
    assert json.loads(created.output)["kwh_cap"] == 5.0

    negative = invoke("budget", "create", "bad", "--period", "daily", "--kwh", "-1", url=database_url)
    assert negative.exit_code != 0
    assert "caps must be finite numbers, zero or more" in str(negative.exception)
    assert [b.name for b in seed.committed(db).list_budgets()] == ["day"]

    (decision_id,) = seed.decisions(db, 1)
    reservation = seed.committed(db).reserve("day", 2.0, 0.5, decision_id)
    listed = json.loads(invoke("budget", "list", "--json", url=database_url).output)
    assert listed[0]["remaining_kwh"] == pytest.approx(3.0) and listed[0]["open_reservations"] == 1

    dry = json.loads(invoke("budget", "release-open", "--older-than", "0", "--dry-run", "--json",
                            url=database_url).output)
    assert [r["reservation_id"] for r in dry["reservations"]] == [reservation] and not dry["released"]
    assert len(seed.committed(db).open_reservations()) == 1

    young = json.loads(invoke("budget", "release-open", "--older-than", "2h", "--json", url=database_url).output)
    assert young["reservations"] == []
    released = json.loads(invoke("budget", "release-open", "--older-than", "0", "--json", url=database_url).output)
    assert [r["reservation_id"] for r in released["reservations"]] == [reservation]
    assert seed.committed(db).open_reservations() == []
    assert seed.committed(db).remaining("day").remaining_kwh == pytest.approx(5.0)


def test_budget_changes_are_said_in_one_line_with_the_period_in_words(database_url: str) -> None:
    lines = [
        invoke("budget", *args, url=database_url).output.strip()
        for args in (
            ("create", "month", "--period", "monthly", "--kwh", "2"),
            ("create", "window", "--period", "rolling_days", "--rolling-days", "30", "--co2", "1", "--scope", "digits"),
            ("create", "each", "--period", "per_run", "--kwh", "0.5"),
            ("disable", "month"),
            ("update", "window", "--co2", "3"),
        )
    ]
    assert lines == [
        "created budget month: 2 kWh, - kg CO2e per UTC month for *",
        "created budget window: - kWh, 1 kg CO2e per rolling 30 days for digits",
        "created budget each: 0.5 kWh, - kg CO2e per run for *",
        "disabled budget month: 2 kWh, - kg CO2e per UTC month for * (disabled)",
        "updated budget window: - kWh, 3 kg CO2e per rolling 30 days for digits",
    ]


def test_audit_formats(database_url: str, db) -> None:
    with db.session() as session:
        decision = seed.decision(session, seed.model(session, name="digits"), action="skip",
                                 blocked_by_budget=True)
        retrained = seed.decision(session, seed.model(session, name="other"))
        run = repo.start_retrain_run(session, retrained.batch.model_id, decision_id=retrained.id)
        repo.finish_retrain_run(session, run.id, "succeeded", epochs=2.0, energy_kwh=0.25, emissions_kg=0.1)

    as_json = invoke("audit", "decisions", "--skipped-for-budget", "--format", "json", url=database_url)
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    assert [row["decision_id"] for row in payload["rows"]] == [decision.id]

    as_csv = invoke("audit", "cost", "--model", "other", "--since", "30d", "--format", "csv", url=database_url)
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [(int(r["run_id"]), float(r["energy_kwh"])) for r in rows] == [(run.id, 0.25)]
    typo = invoke("audit", "cost", "--model", "ohter", url=database_url)
    assert typo.exit_code != 0 and "No model is named 'ohter'" in str(typo.exception)
    assert invoke("audit", "budget", "--model", "not-registered-yet", url=database_url).exit_code == 0  # a scope may precede its model

    table = invoke("audit", "cost", url=database_url)
    assert table.exit_code == 0 and "energy_kwh=0.25" in table.output

    for query in ("errors", "budget", "calibrations"):
        result = invoke("audit", query, "--json", url=database_url)
        assert result.exit_code == 0, (query, result.output)
        assert json.loads(result.output)["query"] == query

    with_sql = invoke("audit", "calibrations", "--model", "digits", "--show-sql", url=database_url)
    assert with_sql.exit_code == 0 and "FROM calibrations" in with_sql.stderr
    statements = [line for line in with_sql.stderr.splitlines() if not line.startswith("-- bound, in order: ")]
    bound = [line for line in with_sql.stderr.splitlines() if line.startswith("-- bound, in order: ")]
    assert "'digits'" not in "\n".join(statements)  # bound, not formatted into the statement
    assert bound and all("name_1 = 'digits'" in line for line in bound)  # and printed beside it

    bad_time = invoke("audit", "cost", "--since", "last tuesday", url=database_url)
    assert bad_time.exit_code != 0 and "Cannot read the time" in str(bad_time.exception)
    backwards = invoke("audit", "budget", "--since", "2027-01-01", "--until", "2026-01-01", url=database_url)
    assert backwards.exit_code != 0 and "is not before --until" in str(backwards.exception)


def test_decisions_table_in_a_pipe_keeps_its_headers_and_names_reasons_by_code(database_url: str, db) -> None:
    from shiftcost.policy import Reason

    reasons = [Reason("drift_detected", "Drift was detected in the batch.", "allow"),
               Reason("over_budget", "The upper bound exceeds what the budget has left.", "defer", {"kwh": 2.5}, "month")]
    with db.session() as session:
        # Brackets in a model's name are text, not a console style tag.
        batch = seed.batch(session, seed.model(session, name="digits[eu]"))
        repo.record_decision(session, batch.id, "defer", [reason.to_dict() for reason in reasons], blocked_by_budget=True)

    # The runner's output is not a terminal; pytest-xdist's workers export COLUMNS=80.
    table = runner.invoke(app, ["audit", "decisions", "--database-url", database_url], env={"COLUMNS": None})
    assert table.exit_code == 0, table.output
    header = next(line for line in table.output.splitlines() if "decision_id" in line)
    assert all(name in header for name in ("created_at", "blocked_by_budget", "predicted_kwh_upper")), header
    row = next(line for line in table.output.splitlines() if "defer" in line)
    assert "drift_detected, over_budget" in row and "message" not in table.output
    assert "digits[eu]" in row
    # A width the caller asks for is kept.
    narrow = runner.invoke(app, ["audit", "decisions", "--database-url", database_url], env={"COLUMNS": "100"})
    assert narrow.exit_code == 0 and max(map(len, narrow.output.splitlines())) <= 100
    # The whole reasons stay in the machine formats.
    [stored] = json.loads(invoke("audit", "decisions", "--json", url=database_url).output)["rows"]
    assert stored["reasons"] == [reason.to_dict() for reason in reasons]


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("shiftcost")
    return subprocess.run([str(executable), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_real_process_from_another_directory(empty_database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SHIFTCOST_DATABASE_URL": empty_database_url}
    env.pop("SHIFTCOST_CONFIG", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    not_yet = invoke("audit", "cost", url=empty_database_url)
    assert not_yet.exit_code != 0 and "run `shiftcost db upgrade`" in str(not_yet.exception)

    upgraded = _run_cli(["db", "upgrade"], env, elsewhere)
    assert upgraded.returncode == 0, upgraded.stderr
    current = _run_cli(["db", "current", "--json"], env, elsewhere)
    assert json.loads(current.stdout)["up_to_date"] is True


def test_unreachable_database_is_one_sentence_without_the_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://auditor:s3cret-pw@127.0.0.1:1/ledger"
    env = {**os.environ, "SHIFTCOST_DATABASE_URL": url}
    result = _run_cli(["budget", "list"], env, tmp_path)
    assert result.returncode == 3
    message = result.stderr.strip()
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "postgresql+psycopg2://auditor:***@127.0.0.1:1/ledger" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
