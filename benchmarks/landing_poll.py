"""Time a poll of the watch flow with nothing new, at 10, 1,000 and 10,000 known entries.

The poll is the real ``watch`` flow (Prefect's local test server, inline mode): list the
landing location, look the entries up, close stale retrain runs, requeue deferred batches,
list pending batches, archive. For each count a fresh database and landing folder are
seeded quickly (tiny files, bulk inserts of done batches and their landing entries), then
the flow runs once to warm up and ``--repeats`` times timed. Two layouts:

* ``archived``: the default; processed entries have moved to the archive, so the landing
  folder is empty and the history lives in the database only;
* ``in-place``: archiving off (``SHIFTCOST_LANDING_ARCHIVE=""``); every known entry is still
  in the landing folder and the poll must skip each without reading it.

Target: median poll time at 10,000 known entries at most 3 x that at 10, in both layouts.

    python benchmarks/landing_poll.py [--counts 10 1000 10000] [--repeats 5] [--url postgresql+psycopg2://...]

With ``--url`` the seeded rows go to fresh schemas of that PostgreSQL database (dropped
afterwards); by default each count gets its own SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

for service in ("TASK_RUN_RECORDER", "EVENT_PERSISTER", "TRIGGERS"):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

MODEL = "bench"


def _database_url(base_url: str | None, folder: Path) -> tuple[str, object]:
    """A migrated, empty database: a SQLite file in ``folder`` or a fresh PostgreSQL schema."""
    from sqlalchemy import create_engine

    from shiftcost.store import migrate

    if base_url is None:
        url = f"sqlite:///{folder / 'shiftcost.db'}"
        migrate.upgrade(url)
        return url, None
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in base_url else "?"
    url = f"{base_url}{separator}options={quote(f'-csearch_path={schema}')}"
    migrate.upgrade(url)
    return url, (admin, schema)


def seed(url: str, landing: Path, count: int, layout: str) -> None:
    """``count`` done batches, each with its landing entry (archived or still in the folder)."""
    from sqlalchemy import insert

    from shiftcost import landing as landing_area
    from shiftcost.store import open_database, repository
    from shiftcost.store.models import Batch, LandingEntry, utcnow

    landing.mkdir(parents=True, exist_ok=True)
    names = [f"batch-{number:06d}.npz" for number in range(count)]
    if layout == "in-place":
        for name in names:
            (landing / name).write_bytes(b"tiny")  # never read: the poll knows it by its signature
        signatures = {entry.name: (entry.uri, entry.signature, entry.size) for entry in landing_area.discover(str(landing))}
    else:
        signatures = {name: (str(landing / name), f"file:4:{number}", 4) for number, name in enumerate(names)}
    now = utcnow()
    database = open_database(url)
    try:
        with database.session() as session:
            model = repository.register_model(session, MODEL, "digits_cnn")
            session.execute(
                insert(Batch),
                [
                    {"id": number + 1, "model_id": model.id, "model_name": MODEL, "source_uri": signatures[name][0],
                     "fingerprint": f"{number:064x}", "samples": 4, "has_labels": True, "status": "done",
                     "registered_at": now, "updated_at": now}
                    for number, name in enumerate(names)
                ],
            )  # fmt: skip
            archived = layout == "archived"
            session.execute(
                insert(LandingEntry),
                [
                    {"id": number + 1, "model_name": MODEL, "location": signatures[name][0], "signature": signatures[name][1],
                     "kind": "file", "size": signatures[name][2], "state": "registered", "batch_id": number + 1, "seen_at": now,
                     "archive_uri": str(landing / "_archive" / f"{number + 1}-{name}") if archived else None,
                     "archived_at": now if archived else None}
                    for number, name in enumerate(names)
                ],
            )  # fmt: skip
    finally:
        database.dispose()


def time_polls(repeats: int) -> list[float]:
    from flows.watch import watch

    watch()  # warm-up: first imports, first connection, first migration check
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = watch()
        times.append(time.perf_counter() - start)
        if results:
            raise SystemExit(f"A poll with nothing new processed batches: {results}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--layouts", nargs="+", default=["archived", "in-place"], choices=["archived", "in-place"])
    parser.add_argument("--url", default=None, help="PostgreSQL URL (default: a SQLite file per count)")
    arguments = parser.parse_args()

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results: dict[str, dict[str, float]] = {}
    with prefect_test_harness(server_startup_timeout=300), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for layout in arguments.layouts:
            results[layout] = {}
            for count in arguments.counts:
                with tempfile.TemporaryDirectory(prefix="shiftcost-landing-bench-") as folder:
                    root = Path(folder)
                    url, cleanup = _database_url(arguments.url, root)
                    try:
                        seed(url, root / "landing", count, layout)
                        os.environ.update(
                            SHIFTCOST_DATABASE_URL=url,
                            SHIFTCOST_LANDING=str(root / "landing"),
                            SHIFTCOST_MODEL_NAME=MODEL,
                            SHIFTCOST_ARTIFACTS_DIR=str(root / "artifacts"),
                            SHIFTCOST_LANDING_ARCHIVE="_archive" if layout == "archived" else "",
                        )
                        times = time_polls(arguments.repeats)
                    finally:
                        if cleanup is not None:
                            admin, schema = cleanup
                            with admin.begin() as connection:
                                connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                            admin.dispose()
                median = statistics.median(times)
                results[layout][str(count)] = median
                print(f"{layout:9s} {count:>6d} known entries: poll with nothing new {median:.3f} s "
                      f"(median of {len(times)}; min {min(times):.3f}, max {max(times):.3f})", flush=True)  # fmt: skip
    verdicts = {}
    smallest, largest = str(min(arguments.counts)), str(max(arguments.counts))
    for layout, medians in results.items():
        ratio = medians[largest] / medians[smallest]
        verdicts[layout] = ratio
        print(f"{layout:9s} ratio {largest}/{smallest}: {ratio:.2f} (target <= 3)")
    backend = "postgresql" if arguments.url else "sqlite"
    print(json.dumps({"backend": backend, "median_poll_s": results, "ratio": verdicts}))
    return 0 if all(ratio <= 3 for ratio in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
