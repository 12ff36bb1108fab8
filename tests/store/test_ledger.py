"""Budget ledger: reservations never overspend, settle/release close exactly once, periods in UTC."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import exc, func, insert, select

from shiftcost.errors import InputError
from shiftcost.store import ledger
from shiftcost.store.errors import BudgetError, BudgetExceededError, NotFoundError, ReservationError
from shiftcost.store.models import Budget, LedgerEntry

from . import seed


def _entries(db) -> list[tuple]:
    with db.session(readonly=True) as session:
        rows = session.execute(select(LedgerEntry).order_by(LedgerEntry.id)).scalars().all()
        return [(e.id, e.kind, e.budget_id, e.decision_id, e.energy_kwh, e.emissions_kg, e.reservation_id)
                for e in rows]


# --- budgets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": "daily", "kwh_cap": -1.0}, "caps must be finite numbers, zero or more"),
        ({"period": "daily", "co2_cap": -0.001}, "caps must be finite numbers, zero or more"),
        ({"period": "daily", "kwh_cap": float("nan")}, "caps must be finite numbers, zero or more"),
        ({"period": "daily", "co2_cap": float("inf")}, "caps must be finite numbers, zero or more"),
        ({"period": "daily"}, "needs a kWh cap"),
        ({"period": "weekly", "kwh_cap": 1.0}, "unknown period"),
        ({"period": "rolling_days", "kwh_cap": 1.0}, "rolling-days"),
        ({"period": "daily", "kwh_cap": 1.0, "rolling_days": 3}, "rolling days apply only"),
    ],
)
def test_invalid_budgets_are_refused_and_nothing_is_written(db, kwargs, message) -> None:
    with pytest.raises(BudgetError, match=message):
        seed.committed(db).create_budget("b", **kwargs)
    assert seed.committed(db).list_budgets() == []


def test_duplicate_budget_name_is_refused(db) -> None:
    seed.committed(db).create_budget("b", period="daily", kwh_cap=1.0)
    with pytest.raises(BudgetError, match="already exists"):
        seed.committed(db).create_budget("b", period="monthly", kwh_cap=5.0)
    assert [(b.name, b.period) for b in seed.committed(db).list_budgets()] == [("b", "daily")]


def test_database_refuses_negative_caps_written_behind_the_api(db) -> None:
    with pytest.raises(exc.IntegrityError), db.session() as session:
        session.execute(insert(Budget).values(name="raw", scope="*", period="daily", kwh_cap=-1.0,
                                              created_at=datetime.now(UTC)))


def test_list_budgets_by_scope(db) -> None:
    seed.committed(db).create_budget("all", period="daily", kwh_cap=1.0)
    seed.committed(db).create_budget("digits-only", period="daily", kwh_cap=1.0, scope="digits")
    seed.committed(db).create_budget("other-only", period="daily", kwh_cap=1.0, scope="other")
    assert [b.name for b in seed.committed(db).list_budgets("digits")] == ["all", "digits-only"]


# --- reserve ----------------------------------------------------------------------------------------


def test_reserve_succeeds_only_within_the_remaining_budget(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0, co2_cap=5.0)
    decision_ids = seed.decisions(db, 3)
    seed.committed(db).reserve("day", 4.0, 1.0, decision_ids[0])
    seed.committed(db).reserve("day", 6.0, 1.0, decision_ids[1])  # exactly the rest of the energy cap
    before = _entries(db)
    with pytest.raises(BudgetExceededError, match="'day'") as raised:
        seed.committed(db).reserve("day", 0.001, 0.0, decision_ids[2])
    assert raised.value.remaining_kwh == pytest.approx(0.0)
    assert _entries(db) == before


def test_carbon_cap_binds_on_its_own(db) -> None:
    seed.committed(db).create_budget("carbon", period="monthly", co2_cap=1.0)
    decision_ids = seed.decisions(db, 2)
    seed.committed(db).reserve("carbon", 1000.0, 0.75, decision_ids[0])  # energy is not capped
    with pytest.raises(BudgetExceededError):
        seed.committed(db).reserve("carbon", 0.0, 0.5, decision_ids[1])
    status = seed.committed(db).remaining("carbon")
    assert status.remaining_kwh is None
    assert status.remaining_co2 == pytest.approx(0.25)


def test_reserve_refuses_bad_amounts_and_unknown_names(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0)
    (decision_id,) = seed.decisions(db, 1)
    with pytest.raises(InputError, match="non-negative"):
        seed.committed(db).reserve("day", -1.0, 0.0, decision_id)
    with pytest.raises(NotFoundError, match="No budget named 'nope'"):
        seed.committed(db).reserve("nope", 1.0, 0.0, decision_id)
    with pytest.raises(NotFoundError, match="decision"):
        seed.committed(db).reserve("day", 1.0, 0.0, 999_999)
    assert _entries(db) == []


def test_reserve_many_is_all_or_nothing(db) -> None:
    seed.committed(db).create_budget("big", period="daily", kwh_cap=10.0)
    seed.committed(db).create_budget("small", period="daily", kwh_cap=1.0)
    decision_ids = seed.decisions(db, 2)
    with pytest.raises(BudgetExceededError, match="'small'"):
        seed.committed(db).reserve_many(["big", "small"], 2.0, 0.0, decision_ids[0])
    assert _entries(db) == []
    ids = seed.committed(db).reserve_many(["big", "small"], 0.5, 0.1, decision_ids[1])
    assert set(ids) == {"big", "small"}
    assert seed.committed(db).settle_decision(decision_ids[1], 0.25, 0.05)
    assert seed.committed(db).remaining("small").remaining_kwh == pytest.approx(0.75)
    assert seed.committed(db).remaining("big").remaining_kwh == pytest.approx(9.75)
    assert seed.committed(db).open_reservations() == []


def test_per_run_budget_limits_each_decision_alone(db) -> None:
    seed.committed(db).create_budget("run", period="per_run", kwh_cap=5.0)
    first, second = seed.decisions(db, 2)
    seed.committed(db).reserve("run", 4.0, 0.0, first)
    seed.committed(db).reserve("run", 4.0, 0.0, second)  # another run: the cap applies afresh
    with pytest.raises(BudgetExceededError):
        seed.committed(db).reserve("run", 2.0, 0.0, first)  # would be 6 kWh for one run
    assert seed.committed(db).remaining("run", decision_id=first).remaining_kwh == pytest.approx(1.0)
    assert seed.committed(db).remaining("run").remaining_kwh == pytest.approx(5.0)


# --- settle and release -------------------------------------------------------------------------------


def test_settle_counts_measured_instead_of_reserved(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0, co2_cap=10.0)
    decision_ids = seed.decisions(db, 3)
    reservation = seed.committed(db).reserve("day", 5.0, 2.0, decision_ids[0])
    seed.committed(db).settle(reservation, 7.5, 3.0)  # reality cost more than predicted: recorded as is
    status = seed.committed(db).remaining("day")
    assert (status.settled_kwh, status.reserved_kwh, status.open_reservations) == (7.5, 0.0, 0)
    assert status.remaining_kwh == pytest.approx(2.5)
    assert status.remaining_co2 == pytest.approx(7.0)
    with pytest.raises(BudgetExceededError):
        seed.committed(db).reserve("day", 3.0, 0.0, decision_ids[1])
    seed.committed(db).reserve("day", 2.5, 0.0, decision_ids[2])


@pytest.mark.parametrize("first", ["settle", "release"])
@pytest.mark.parametrize("second", ["settle", "release"])
def test_a_reservation_closes_only_once(db, first: str, second: str) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0)
    (decision_id,) = seed.decisions(db, 1)
    reservation = seed.committed(db).reserve("day", 5.0, 1.0, decision_id)
    close = {"settle": lambda: seed.committed(db).settle(reservation, 4.0, 1.0),
             "release": lambda: seed.committed(db).release(reservation, "run failed")}
    close[first]()
    now = datetime.now(UTC)
    before, remaining_before = _entries(db), seed.committed(db).remaining("day", at=now)
    with pytest.raises(ReservationError, match=f"already {first}d at .*nothing was {second}d"):
        close[second]()
    assert _entries(db) == before
    assert seed.committed(db).remaining("day", at=now) == remaining_before


def test_settle_of_unknown_or_non_reservation_is_refused(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0)
    (decision_id,) = seed.decisions(db, 1)
    reservation = seed.committed(db).reserve("day", 5.0, 1.0, decision_id)
    settle_entry = seed.committed(db).settle(reservation, 4.0, 1.0)
    before = _entries(db)
    with pytest.raises(ReservationError, match="no reservation 424242"):
        seed.committed(db).settle(424242, 1.0, 1.0)
    with pytest.raises(ReservationError, match=f"no reservation {settle_entry}"):
        seed.committed(db).settle(settle_entry, 1.0, 1.0)
    with pytest.raises(InputError):
        seed.committed(db).settle(reservation, -1.0, 0.0)
    with pytest.raises(InputError, match="reason"):
        seed.committed(db).release(reservation, " ")
    assert _entries(db) == before


def test_racing_settles_close_a_reservation_once(db_many) -> None:
    seed.committed(db_many).create_budget("day", period="daily", kwh_cap=10.0)
    (decision_id,) = seed.decisions(db_many, 1)
    reservation = seed.committed(db_many).reserve("day", 5.0, 1.0, decision_id)
    outcomes = _race(16, lambda i: seed.committed(db_many).settle(reservation, float(i), 0.0))
    assert sum(isinstance(o, int) for o in outcomes) == 1
    assert all(isinstance(o, (int, ReservationError)) for o in outcomes), outcomes
    with db_many.session(readonly=True) as session:
        closes = session.scalar(select(func.count()).where(LedgerEntry.reservation_id == reservation))
    assert closes == 1


# --- periods ------------------------------------------------------------------------------------------


def _expected_usage(events, start, end) -> tuple[float, float]:
    """Independent rule: open reservations count reserved, settled count measured, released nothing."""
    spent_kwh = spent_co2 = 0.0
    for at, reserved, outcome, measured in events:
        if start is not None and not start <= at < end:
            continue
        if outcome == "open":
            spent_kwh, spent_co2 = spent_kwh + reserved[0], spent_co2 + reserved[1]
        elif outcome == "settle":
            spent_kwh, spent_co2 = spent_kwh + measured[0], spent_co2 + measured[1]
    return spent_kwh, spent_co2


def test_remaining_per_period_matches_an_independent_count(db) -> None:
    rng = random.Random(7)
    origin = datetime(2025, 3, 30, 0, 0, tzinfo=UTC)
    seed.committed(db).create_budget("daily", period="daily", kwh_cap=1e6, co2_cap=1e6)
    seed.committed(db).create_budget("monthly", period="monthly", kwh_cap=1e6, co2_cap=1e6)
    seed.committed(db).create_budget("rolling", period="rolling_days", rolling_days=3, kwh_cap=1e6, co2_cap=1e6)
    decision_ids = seed.decisions(db, 40)
    events = []
    for decision_id in decision_ids:
        at = origin + timedelta(hours=rng.uniform(0, 24 * 6))  # spans a month boundary
        reserved = (round(rng.uniform(0, 5), 3), round(rng.uniform(0, 2), 3))
        outcome = rng.choice(["open", "settle", "release"])
        measured = (round(rng.uniform(0, 6), 3), round(rng.uniform(0, 2), 3))
        ids = seed.committed(db).reserve_many(["daily", "monthly", "rolling"], *reserved, decision_id, at=at)
        for reservation in ids.values():
            if outcome == "settle":
                seed.committed(db).settle(reservation, *measured)
            elif outcome == "release":
                seed.committed(db).release(reservation, "test")
        events.append((at, reserved, outcome, measured))

    for probe in [origin + timedelta(hours=h) for h in (5, 30, 47.5, 49, 80, 100, 150)]:
        day = probe.replace(hour=0, minute=0, second=0, microsecond=0)
        month = probe.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        next_month = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        windows = {
            "daily": (day, day + timedelta(days=1)),
            "monthly": (month, next_month),
            "rolling": (probe - timedelta(days=3), probe + timedelta(microseconds=1)),
        }
        for name, (start, end) in windows.items():
            status = seed.committed(db).remaining(name, at=probe)
            kwh, co2 = _expected_usage(events, start, end)
            assert status.spent_kwh == pytest.approx(kwh), (name, probe)
            assert status.spent_co2 == pytest.approx(co2), (name, probe)
            assert status.remaining_kwh == pytest.approx(1e6 - kwh)


def test_day_boundary_is_utc_midnight(db) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=1.0)
    decision_ids = seed.decisions(db, 2)
    late = datetime(2025, 6, 1, 23, 59, 59, 999_000, tzinfo=UTC)
    seed.committed(db).reserve("day", 1.0, 0.0, decision_ids[0], at=late)
    # 01:30 in UTC+2 on June 2nd is still June 1st 23:30 UTC: the same, full, day.
    same_day = datetime.fromisoformat("2025-06-02T01:30:00+02:00")
    with pytest.raises(BudgetExceededError):
        seed.committed(db).reserve("day", 0.5, 0.0, decision_ids[1], at=same_day)
    seed.committed(db).reserve("day", 1.0, 0.0, decision_ids[1], at=late + timedelta(milliseconds=1))


# --- a crash between reserve and settle -------------------------------------------------------------------

_CRASHING_RUN = """
import os, sys
from shiftcost.store import ledger, open_database
db = open_database(sys.argv[1])
with db.session() as session:
    reservation = ledger.reserve(session, "day", 3.0, 1.0, int(sys.argv[2]))
print(reservation, flush=True)
os._exit(9)  # dies before it can settle or release
"""


def test_crash_leaves_an_open_reservation_that_release_open_clears(db, database_url) -> None:
    seed.committed(db).create_budget("day", period="daily", kwh_cap=10.0, co2_cap=10.0)
    (decision_id,) = seed.decisions(db, 1)
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_RUN, database_url, str(decision_id)],
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr
    reservation = int(crashed.stdout.split()[0])

    [left_open] = seed.committed(db).open_reservations()
    assert (left_open.id, left_open.budget, left_open.kwh, left_open.co2) == (reservation, "day", 3.0, 1.0)
    assert seed.committed(db).remaining("day").remaining_kwh == pytest.approx(7.0)  # counted once
    assert seed.committed(db).open_reservations(timedelta(hours=1)) == []  # too young for that filter

    released = seed.committed(db).release_open(timedelta(0), "run crashed")
    assert [r.id for r in released] == [reservation]
    assert seed.committed(db).open_reservations() == []
    assert seed.committed(db).remaining("day").remaining_kwh == pytest.approx(10.0)
    assert seed.committed(db).release_open(timedelta(0), "again") == []
    with pytest.raises(ReservationError, match="already released"):
        seed.committed(db).settle(reservation, 3.0, 1.0)


def test_release_decision_frees_all_its_reservations(db) -> None:
    seed.committed(db).create_budget("a", period="daily", kwh_cap=10.0)
    seed.committed(db).create_budget("b", period="monthly", kwh_cap=10.0)
    (decision_id,) = seed.decisions(db, 1)
    seed.committed(db).reserve_many(["a", "b"], 4.0, 0.0, decision_id)
    assert len(seed.committed(db).release_decision(decision_id, "retrain crashed")) == 2
    assert [s.remaining_kwh for s in seed.committed(db).budget_status()] == [10.0, 10.0]


# --- concurrency ---------------------------------------------------------------------------------------------


@pytest.fixture
def db_many(database_url: str):
    """A database whose pool holds a connection for each of 16 racing threads."""
    from shiftcost.store import open_database

    database = open_database(database_url, pool_size=16, max_overflow=4)
    yield database
    database.dispose()


def _race(threads: int, work) -> list[object]:
    barrier = threading.Barrier(threads)
    outcomes: list[object] = [None] * threads

    def runner(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = work(i)
        except Exception as error:  # collected and asserted on by the caller
            outcomes[i] = error

    pool = [threading.Thread(target=runner, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return outcomes


THREADS = 16
# PostgreSQL is where concurrent writers really interleave; SQLite serialises every writer
# through its file lock (and waits with a coarse back-off), so fewer rounds suffice there.
ROUNDS = {"postgres": 20, "sqlite": 5}


def test_racing_reservations_never_exceed_the_cap(db_many, backend: str) -> None:
    decision_ids = seed.decisions(db_many, THREADS)
    for round_number in range(ROUNDS[backend]):
        name = f"race-{round_number}"
        seed.committed(db_many).create_budget(name, period="daily", kwh_cap=10.0, co2_cap=100.0)
        outcomes = _race(THREADS, lambda i: seed.committed(db_many).reserve(name, 1.0, 1.0, decision_ids[i]))
        unexpected = [o for o in outcomes if not isinstance(o, (int, BudgetExceededError))]
        assert not unexpected, unexpected
        status = seed.committed(db_many).remaining(name)
        assert status.reserved_kwh <= 10.0 + 1e-9, f"round {round_number} overspent: {status}"
        assert sum(isinstance(o, int) for o in outcomes) == 10, f"round {round_number}: {outcomes}"
        assert status.open_reservations == 10


def test_the_ledger_takes_only_a_session(db) -> None:
    # The caller owns the transaction: a Database (or an Engine) would let the argument's
    # type decide what commits together.
    with pytest.raises(TypeError, match=r"takes a sqlalchemy Session \(got Database\)"):
        ledger.list_budgets(db)
    with pytest.raises(TypeError, match=r"\(got Engine\)"):
        ledger.remaining(db.engine, "day")
