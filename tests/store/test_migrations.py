"""Migrations: empty -> head -> base -> head on both databases, no drift from the models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shiftcost.store import migrate, open_database
from shiftcost.store.db import make_engine
from shiftcost.store.errors import SchemaVersionError
from shiftcost.store.models import Base

EXPECTED_TABLES = {
    "models", "reference_stats", "batches", "drift_reports", "index_runs", "cost_predictions",
    "decisions", "retrain_runs", "calibrations", "energy_probes", "budgets", "budget_ledger", "landing_entries",
}


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        assert _tables(engine) == set()
        assert migrate.current_revisions(engine) == ()
        migrate.upgrade(engine)
        assert _tables(engine) == EXPECTED_TABLES
        assert migrate.current_revisions(engine) == migrate.head_revisions()
        migrate.downgrade(engine, "base")
        assert _tables(engine) == set()
        assert migrate.current_revisions(engine) == ()
        migrate.upgrade(engine)
        assert _tables(engine) == EXPECTED_TABLES
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_unmigrated_database_asks_for_upgrade(empty_database_url: str) -> None:
    with pytest.raises(SchemaVersionError, match="run `shiftcost db upgrade`"):
        open_database(empty_database_url)


def test_older_schema_asks_for_upgrade(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as connection:
            # A database stamped by an older shiftcost (revision the code still knows):
            # simulate by pointing at base, i.e. no revision but tables present.
            connection.exec_driver_sql("DELETE FROM alembic_version")
    finally:
        engine.dispose()
    with pytest.raises(SchemaVersionError) as raised:
        open_database(empty_database_url)
    assert "shiftcost db upgrade" in str(raised.value)
    assert "needs 0001" in str(raised.value) or migrate.head_revisions()[0] in str(raised.value)


def test_newer_schema_asks_to_upgrade_shiftcost(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffff'")
    finally:
        engine.dispose()
    with pytest.raises(SchemaVersionError, match="newer than this shiftcost"):
        open_database(database_url)


def test_open_database_can_upgrade_first(empty_database_url: str) -> None:
    database = open_database(empty_database_url, upgrade=True)
    try:
        assert migrate.current_revisions(database.engine) == migrate.head_revisions()
    finally:
        database.dispose()


def test_revisions_do_not_import_the_models() -> None:
    versions = migrate.migrations_directory() / "versions"
    scripts = [p for p in versions.glob("*.py") if p.name != "__init__.py"]
    assert scripts, "no revision scripts found"
    for script in scripts:
        tree = ast.parse(Path(script).read_text())
        imported = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(name.startswith("shiftcost") for name in imported), script.name


def test_0009_marks_priced_the_settlements_whose_reason_says_so_and_0008_reads_them_back(empty_database_url: str) -> None:
    from shiftcost.store import ledger
    from shiftcost.store.models import LedgerEntry
    from tests.store import seed

    engine = make_engine(empty_database_url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    database = open_database(empty_database_url)
    try:
        seed.committed(database).create_budget("month", period="monthly", kwh_cap=1.0)
        priced_decision, measured_decision = seed.decisions(database, 2)
        for decision_id in (priced_decision, measured_decision):
            seed.committed(database).reserve("month", 0.2, 0.0, decision_id)
        seed.committed(database).settle_decision(priced_decision, 0.05, 0.0, note="retrain run 1 abandoned", priced=True)
        seed.committed(database).settle_decision(measured_decision, 0.07, 0.0)

        migrate.downgrade(database.engine, "0008")
        with database.engine.connect() as connection:
            assert "priced" not in {c["name"] for c in inspect(connection).get_columns("budget_ledger")}
        migrate.upgrade(database.engine)

        with database.session(readonly=True) as session:
            settles = {e.decision_id: e for e in session.query(LedgerEntry).filter_by(kind="settle")}
        assert settles[priced_decision].priced and ledger.PRICED_NOT_MEASURED in settles[priced_decision].reason
        assert not settles[measured_decision].priced
        # The flag is the ledger's reading, not the text: the restored settlement can be replaced once.
        replaced = seed.committed(database).settle_decision(priced_decision, 0.08, 0.0, replaces_priced=True)
        assert len(replaced) == 1 and seed.committed(database).settle_decision(measured_decision, 0.08, 0.0, replaces_priced=True) == []
    finally:
        database.dispose()
