"""Time the audit queries on a PostgreSQL schema seeded with a large history.

Seeds a fresh schema (dropped afterwards unless --keep) with 100,000 decisions (each with
its batch, index run and cost prediction) and 10,000 retrain runs with ledger entries,
loaded with COPY, then runs every audit query several times and prints JSON with, per
query, the median wall time measured end to end (SQL, fetch, Python post-processing) and
the median CPU time it costs (this process plus the PostgreSQL backend, read from
/proc when the server runs on this machine), which is what the wall time would be on an
idle machine. Target: under 200 ms per query. ``--explain`` adds EXPLAIN ANALYZE of each
statement.

    python benchmarks/audit_queries.py [--url postgresql+psycopg2://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from shiftcost.store import audit, migrate, open_database

DEFAULT_URL = os.environ.get("SHIFTCOST_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MODEL_NAMES = ["digits", "fashion", "faces", "sensors"]
END = datetime(2025, 12, 31, tzinfo=UTC)


def _copy(cursor, table: str, columns: list[str], rows) -> int:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    count = 0
    for row in rows:
        writer.writerow(["\\N" if value is None else value for value in row])
        count += 1
    buffer.seek(0)
    cursor.copy_expert(
        f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buffer
    )
    return count


def seed(engine, decisions: int, runs: int, rng: random.Random) -> dict[str, int]:
    """Fill the schema; ids are assigned here so rows can reference each other."""
    raw = engine.raw_connection()
    counts: dict[str, int] = {}
    try:
        cursor = raw.cursor()
        models = []  # (id, name, version, architecture)
        for i, name in enumerate(MODEL_NAMES):
            for version in (1, 2, 3):
                models.append((len(models) + 1, name, version, f"arch-{i % 2}"))
        start = END - timedelta(days=365)
        counts["models"] = _copy(cursor, "models", ["id", "name", "version", "architecture", "layers", "created_at"],
                                 ((mid, n, v, a, '["fc1"]', start.isoformat()) for mid, n, v, a in models))

        decision_rows, batch_rows, index_rows, prediction_rows = [], [], [], []
        retrain_decisions = set(rng.sample(range(1, decisions + 1), runs))
        for did in range(1, decisions + 1):
            mid, name, _, _ = rng.choice(models)
            at = start + timedelta(seconds=rng.uniform(0, 365 * 86400))
            batch_rows.append((did, mid, name, f"file:///landing/{did}.npz", uuid.uuid4().hex, 512, True,
                               "done", at.isoformat(), at.isoformat()))
            index_rows.append((did, did, mid, rng.random(), rng.random(), 512, 0.3, at.isoformat()))
            kwh = rng.uniform(0.001, 0.05)
            prediction_rows.append((did, did, kwh * 100, kwh * 70, kwh * 140, kwh, kwh * 0.7, kwh * 1.4,
                                    kwh * 0.4, kwh * 0.28, kwh * 0.56, 0.9, False, at.isoformat()))
            if did in retrain_decisions:
                action, blocked, reasons = "retrain", False, '["drift detected", "fits every budget"]'
            else:
                action = rng.choice(["skip", "skip", "defer"])
                blocked = rng.random() < 0.3
                reasons = '["over budget daily"]' if blocked else '["no drift detected"]'
            decision_rows.append((did, did, mid, did, action, reasons, blocked, '[]', '{}', at.isoformat()))
        counts["batches"] = _copy(cursor, "batches", ["id", "model_id", "model_name", "source_uri", "fingerprint",
                                                      "samples", "has_labels", "status", "registered_at",
                                                      "updated_at"], batch_rows)
        counts["index_runs"] = _copy(cursor, "index_runs", ["id", "batch_id", "model_id", "resque_dist", "inv_ari",
                                                            "samples", "seconds", "created_at"], index_rows)
        counts["cost_predictions"] = _copy(
            cursor, "cost_predictions",
            ["id", "index_run_id", "epochs", "epochs_lower", "epochs_upper", "energy_kwh", "energy_kwh_lower",
             "energy_kwh_upper", "emissions_kg", "emissions_kg_lower", "emissions_kg_upper", "interval_level",
             "predicted_not_to_converge", "created_at"], prediction_rows)
        counts["decisions"] = _copy(cursor, "decisions", ["id", "batch_id", "model_id", "cost_prediction_id",
                                                          "action", "reasons", "blocked_by_budget",
                                                          "budget_state", "policy", "created_at"], decision_rows)

        by_id = {row[0]: row for row in decision_rows}
        predicted = {row[0]: row[5] for row in prediction_rows}
        run_rows, ledger_rows = [], []
        budgets = [(1, "daily-all", "*", "daily", None, 50.0, 20.0), (2, "monthly-all", "*", "monthly", None, 800.0, 300.0),
                   (3, "rolling-week", "*", "rolling_days", 7, 300.0, None), (4, "per-run", "*", "per_run", None, 1.0, None)]
        counts["budgets"] = _copy(cursor, "budgets", ["id", "name", "scope", "period", "rolling_days", "kwh_cap",
                                                      "co2_cap", "created_at"],
                                  ((*b, start.isoformat()) for b in budgets))
        entry_id = 0
        for rid, did in enumerate(sorted(retrain_decisions), start=1):
            _, _, mid, _, _, _, _, _, _, at_text = by_id[did]
            at = datetime.fromisoformat(at_text)
            status = rng.choices(["succeeded", "cap_reached", "failed"], weights=[85, 10, 5])[0]
            kwh = None if status == "failed" else predicted[did] * rng.uniform(0.6, 1.5)
            co2 = None if kwh is None else kwh * 0.4
            run_rows.append((rid, did, did, mid, status, 512, rng.randint(10, 500),
                             None if kwh is None else kwh * 100, status == "succeeded", kwh, co2, "estimated",
                             rng.uniform(5, 300), (at + timedelta(minutes=1)).isoformat(),
                             (at + timedelta(minutes=9)).isoformat()))
            for budget_id in (1, 2, 3, 4):
                entry_id += 1
                reserve_id = entry_id
                ledger_rows.append((reserve_id, budget_id, did, "reserve", predicted[did] * 1.4,
                                    predicted[did] * 0.56, None, None, at.isoformat()))
                entry_id += 1
                closing = "release" if kwh is None else "settle"
                ledger_rows.append((entry_id, budget_id, did, closing, kwh or 0.0, co2 or 0.0, reserve_id,
                                    "run failed" if kwh is None else None,
                                    (at + timedelta(minutes=10)).isoformat()))
        counts["retrain_runs"] = _copy(
            cursor, "retrain_runs",
            ["id", "decision_id", "batch_id", "model_id", "status", "samples", "steps", "epochs", "reached_cutoff",
             "energy_kwh", "emissions_kg", "energy_method", "wall_seconds", "started_at", "finished_at"], run_rows)
        counts["budget_ledger"] = _copy(cursor, "budget_ledger", ["id", "budget_id", "decision_id", "kind",
                                                                  "energy_kwh", "emissions_kg", "reservation_id",
                                                                  "reason", "created_at"], ledger_rows)
        calibration_rows = []
        for cid in range(1, 201):
            arch = f"arch-{cid % 2}"
            calibration_rows.append((cid, arch, (cid + 1) // 2, "refit", 10 + cid, '{"points": []}',
                                     '{"slope": 1.0}', rng.uniform(0.05, 0.4),
                                     (start + timedelta(days=cid * 1.8)).isoformat()))
        counts["calibrations"] = _copy(cursor, "calibrations", ["id", "architecture", "version", "source", "n_points",
                                                                "fit_data", "parameters", "loo_error", "created_at"],
                                       calibration_rows)
        for table in counts:
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        raw.commit()
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return counts


def cases() -> dict[str, tuple[str, dict]]:
    """Each audit query as the CLI runs it by default (newest 1000 rows, totals over all),
    with typical filters, and as a full dump of every matching row."""
    quarter = END - timedelta(days=91)
    return {
        "cost": ("cost", {"limit": 1000}),
        "cost --model --since 90d": ("cost", {"model": "digits", "since": quarter, "limit": 1000}),
        "cost --limit 0 (all 10,000 runs)": ("cost", {}),
        "errors": ("errors", {"limit": 1000}),
        "errors --model --since 90d": ("errors", {"model": "digits", "since": quarter, "limit": 1000}),
        "errors --limit 0 (all runs)": ("errors", {}),
        "decisions": ("decisions", {"limit": 1000}),
        "decisions --skipped-for-budget": ("decisions", {"skipped_for_budget": True, "limit": 1000}),
        "decisions --model --since 90d": ("decisions", {"model": "digits", "since": quarter, "limit": 1000}),
        "budget": ("budget", {}),
        "budget --since 90d": ("budget", {"since": quarter}),
        "calibrations": ("calibrations", {}),
        "calibrations --model": ("calibrations", {"model": "digits"}),
    }


def _backend_cpu_ns(pid: int) -> int | None:
    """CPU time the PostgreSQL backend ``pid`` has used, when it runs on this machine."""
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[0])
    except OSError:
        return None


def time_query(database, name: str, filters: dict, repeat: int) -> dict[str, float | int | None]:
    """Median wall time of one audit query, and the CPU it costs (client + server backend).

    Wall time depends on what else runs on the machine; the CPU time (this process plus the
    PostgreSQL backend, with parallel workers off so the backend does all the server work)
    is what the query costs on an otherwise idle machine.
    """
    from sqlalchemy import text

    wall, cpu = [], []
    rows = 0
    for attempt in range(repeat + 1):  # the first run warms caches and is not counted
        with database.session(readonly=True) as session:
            began = time.perf_counter()
            result = audit.run(session, name, **filters)
            elapsed = (time.perf_counter() - began) * 1000
        rows = len(result.rows)
        with database.session(readonly=True) as session:
            session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            server_before, client_before = _backend_cpu_ns(pid), time.process_time_ns()
            audit.run(session, name, **filters)
            client = time.process_time_ns() - client_before
            server_after = _backend_cpu_ns(pid)
        if attempt:
            wall.append(elapsed)
            if server_before is not None and server_after is not None:
                cpu.append((client + server_after - server_before) / 1e6)
    return {
        "median_ms": round(statistics.median(wall), 1),
        "max_ms": round(max(wall), 1),
        "median_cpu_ms": round(statistics.median(cpu), 1) if cpu else None,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL URL (a schema is created inside it)")
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per query (median reported)")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of each statement")
    parser.add_argument("--keep", action="store_true", help="keep the schema afterwards")
    parser.add_argument("--reuse", metavar="SCHEMA", help="time queries on a schema kept by --keep")
    args = parser.parse_args()

    from sqlalchemy import create_engine

    schema = args.reuse or f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(args.url)
    if not args.reuse:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in args.url else "?"
    url = f"{args.url}{separator}options={quote(f'-csearch_path={schema}')}"
    report: dict[str, object] = {"schema": schema}
    try:
        if not args.reuse:
            migrate.upgrade(url)
        database = open_database(url)
        if not args.reuse:
            began = time.perf_counter()
            report["rows"] = seed(database.engine, args.decisions, args.runs, random.Random(1))
            report["seed_seconds"] = round(time.perf_counter() - began, 2)
        timings: dict[str, dict[str, float | int]] = {}
        for label, (name, filters) in cases().items():
            timings[label] = time_query(database, name, filters, args.repeat)
            if args.explain:
                _explain(database, label, name, filters)
        report["queries"] = timings
        report["all_under_200_ms"] = all(t["median_ms"] < 200 for t in timings.values())
        report["all_cpu_under_200_ms"] = all(t["median_cpu_ms"] < 200 for t in timings.values())
        report["load_average"] = os.getloadavg()
        database.dispose()
    finally:
        if not (args.keep or args.reuse):
            with admin.begin() as connection:
                connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _explain(database, label: str, name: str, filters: dict) -> None:
    """EXPLAIN ANALYZE every statement the audit query sends (printed to stderr)."""
    from sqlalchemy import event

    captured: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        captured.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", capture)
    try:
        with database.session(readonly=True) as session:
            audit.run(session, name, **filters)
    finally:
        event.remove(database.engine, "before_cursor_execute", capture)
    raw = database.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in captured:
            cursor.execute(f"EXPLAIN ANALYZE {statement}", parameters)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            print(f"--- {label}\n{plan}", file=sys.stderr)
        raw.rollback()
    finally:
        raw.close()


if __name__ == "__main__":
    main()
