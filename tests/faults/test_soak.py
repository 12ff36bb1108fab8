"""Soak: 200 batches of every kind through four concurrent watchers on PostgreSQL, with
watcher processes killed at random (mid-assessment or mid-retrain). At the end every batch
is in a final state, every reservation is closed exactly once, and the ledger's settled
total equals the sum of the spends the runs measured (a run that failed after measuring
settles what it measured; a run killed outright measured nothing and is released).

Most batches cost nothing to train on (duplicates, corrupt, oversized and linked files are
refused or matched at registration); a modest share is clean or shifted and assessed, the
shifted ones retrained with small caps, so the soak stays within a few minutes.

The watchers run the library pipeline (``watch_once``), the same steps the Prefect watch
flow wraps, not the flow itself: measured on this project's 2-core CI machine under load, a
watcher process importing Prefect and the flows took 22 s before its first poll and its
first flow run another 5.8 s (an empty poll 1.9 s after that), against a Prefect test
server that took 15-19 s to start. Every kill restarts a watcher and pays that cold start
again, and every assessed batch adds a subflow run; the soak would no longer fit its time.
The flows' own fault handling (crashes, lost results, handoff) is tested in ``tests/flows``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flow_support import PipelineEnv, brightened

from shiftcost import pipeline
from shiftcost.store import audit
from tests.store import seed
from shiftcost.store import models as db

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])]

BATCHES = int(os.environ.get("SOAK_BATCHES", "200"))
WATCHERS = 4
KILLS = int(os.environ.get("SOAK_KILLS", "6"))
LIMIT_S = 600  # each watcher's own limit, a guard against a hang: watchers stop once idle
IMAGES = 40  # per batch: enough for the drift tests, cheap to assess
RETRAIN_IMAGES = 120  # per shifted batch: a retrain long enough to be killed while it runs
# Kinds and their weights: about one batch in six is assessed, one in twelve retrained.
KINDS = {"clean": 2, "shifted": 2, "duplicate": 6, "corrupt": 4, "oversized": 4, "linked": 6}
WORKER = Path(__file__).with_name("soak_worker.py")
FINAL = {"done", "failed"}


def _land(env: PipelineEnv, rng: random.Random, outside: Path) -> Counter:
    """Drop ``BATCHES`` batches of mixed kinds; returns how many of each kind."""
    kinds = Counter()
    x_all, y_all = env.trained.splits["stream"]
    for i in range(BATCHES):
        (kind,) = rng.choices(list(KINDS), weights=list(KINDS.values()))
        kinds[kind] += 1
        images = RETRAIN_IMAGES if kind == "shifted" else IMAGES
        start = rng.randrange(0, len(x_all) - images)
        x, y = x_all[start:start + images], y_all[start:start + images]
        name = f"{i:03d}-{kind}.npz"
        if kind == "clean":
            env.drop(name, x, y)
        elif kind == "shifted":
            env.drop(name, brightened(x, 0.5 + rng.random() * 0.3), y)
        elif kind == "duplicate":
            earlier = sorted(env.landing.glob("*-clean.npz")) + sorted(env.landing.glob("*-shifted.npz"))
            if earlier:
                (env.landing / name).write_bytes(rng.choice(earlier).read_bytes())
            else:
                env.drop(name, x, y)
        elif kind == "corrupt":
            (env.landing / name).write_bytes(os.urandom(2000))
        elif kind == "oversized":  # a few kB declaring more than SHIFTCOST_MAX_BATCH_BYTES
            np.savez_compressed(env.landing / name, x=np.zeros((600, 1, 64, 64), np.uint8))
        else:
            target = outside / name
            np.savez(target, x=(x.numpy() * 255).astype(np.uint8), y=y.numpy())
            (env.landing / name).symlink_to(target)
    return kinds


def test_soak_many_batches_four_watchers_random_kills(pipeline_env: PipelineEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = pipeline_env
    rng = random.Random(20261202)
    for key, value in {
        "SHIFTCOST_CLAIM_LEASE_S": "4",  # an assessment killed mid-way is taken over after 4 s
        "SHIFTCOST_RETRAIN_STALE_AFTER_S": "3",  # a retrain with no heartbeat for 3 s is dead
        "SHIFTCOST_RETRAIN_HEARTBEAT_S": "0.5",
        "SHIFTCOST_RETRAIN_MAX_EPOCHS": "2",
        "SHIFTCOST_MAX_BATCH_BYTES": str(2**20),
        "OMP_NUM_THREADS": "1",  # four watchers share a small machine
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }.items():
        monkeypatch.setenv(key, value)
    env.budget("monthly", period="monthly", kwh=50.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    kinds = _land(env, rng, outside)

    logs = tmp_path / "watchers"
    logs.mkdir()

    def start(slot: int) -> subprocess.Popen:
        with open(logs / f"{slot}-{time.monotonic_ns()}.log", "w") as log:
            return subprocess.Popen([sys.executable, str(WORKER), str(LIMIT_S), "4"], stdout=log, stderr=log)

    watchers = [start(slot) for slot in range(WATCHERS)]
    kills: Counter = Counter()
    began = time.monotonic()
    while sum("ready" in log.read_text() for log in logs.iterdir()) < WATCHERS and time.monotonic() - began < LIMIT_S:
        time.sleep(0.5)
    ready_s = time.monotonic() - began
    next_kill = time.monotonic()
    while any(w.poll() is None for w in watchers) and time.monotonic() - began < LIMIT_S + 30:
        time.sleep(0.3)
        if time.monotonic() < next_kill or sum(kills.values()) >= KILLS:
            continue
        busy = Counter(b.status for b in env.rows(db.Batch))
        crashed = kills["all four while a batch was retraining"]
        if not (busy["retraining"] or (busy["assessing"] and sum(kills.values()) - crashed < KILLS - 1)):
            continue  # one kill is kept for a retrain
        if busy["retraining"] and not kills["all four while a batch was retraining"]:
            # Once, a crash of the whole machine while a retrain runs: every watcher dies,
            # the retrain's process among them, and fresh ones take over.
            kills["all four while a batch was retraining"] += 1
            victims = range(WATCHERS)
        else:
            # A watcher killed while a batch is assessed or retrained: with four at work the
            # victim is often (not always) the one doing it, as with a real crash.
            kills["one while a batch was retraining" if busy["retraining"] else "one while a batch was assessed"] += 1
            victims = [rng.randrange(WATCHERS)]
        for victim in victims:
            if watchers[victim].poll() is None:
                watchers[victim].send_signal(signal.SIGKILL)
                watchers[victim].wait()
            watchers[victim] = start(victim)
        next_kill = time.monotonic() + 4 + rng.random() * 4
    for w in watchers:
        if w.poll() is None:
            w.kill()
        w.wait()

    # What an operator does after the storm: retrain what was decided but whose watcher died
    # before starting it, and release what no live run holds.
    with pipeline.connect(env.settings) as database:
        waiting = [b.id for b in env.rows(db.Batch, db.Batch.status == "assessed")
                   if pipeline.retrain_outcome_of(database, b.id).status == "not_started"]
        for batch_id in waiting:
            try:
                pipeline.run_retrain(database, env.settings, batch_id)
            except pipeline.RetrainFailed:
                pass
        from datetime import timedelta

        pipeline.fail_stale_retrains(database, env.settings.model_name, 3)
        seed.committed(database).release_open(timedelta(0), "soak: left open", lease=timedelta(seconds=3))
        with database.session(readonly=True) as session:
            audit_totals = audit.budget_burn(session).totals
        open_left = seed.committed(database).remaining("monthly").open_reservations

    batches = env.rows(db.Batch)
    statuses = Counter(b.status for b in batches)
    deferred = [b for b in batches if b.status == "assessed"]
    failures = [line for log in logs.iterdir() for line in log.read_text().splitlines() if "poll failed" in line]
    print(f"\nsoak: {BATCHES} batches {dict(kinds)} -> {len(batches)} rows {dict(statuses)}; kills {dict(kills)}; "
          f"operator retrained {len(waiting)}; {time.monotonic() - began:.0f} s ({ready_s:.0f} s to start the watchers); "
          f"failed polls {failures[:5]}")
    for b in batches:
        if b.status == "failed":
            print(f"  {b.source_uri.rsplit('/', 1)[-1]}: {(b.failure_reason or '')[:160]}")
    assert not deferred, "a batch is still waiting"
    assert set(statuses) <= FINAL
    # Every landed entry was seen once and ended as a batch (its own, or the one it duplicates).
    landed = env.rows(db.LandingEntry)
    assert len(landed) == len({Path(e.location).name for e in landed}) == BATCHES
    assert all(e.batch_id is not None for e in landed)
    assert set(Counter(e.state for e in landed)) <= {"registered", "failed", "duplicate"}

    entries = env.rows(db.LedgerEntry)
    by_id = {e.id: e for e in entries}
    reserves = [e for e in entries if e.kind == "reserve"]
    closes = Counter(e.reservation_id for e in entries if e.reservation_id is not None and by_id[e.reservation_id].kind == "reserve")
    assert all(closes[r.id] == 1 for r in reserves), "a reservation is open or closed twice"
    late = [e for e in entries if e.reservation_id is not None and by_id[e.reservation_id].kind == "release"]
    assert all(by_id[e.reservation_id].kind == "release" and e.kind == "settle" for e in late)

    runs = env.rows(db.RetrainRun)
    spent = [r for r in runs if r.energy_kwh is not None]
    print(f"  ledger: {len(reserves)} reservations, {sum(e.kind == 'settle' for e in entries) - len(late)} settled, "
          f"{sum(e.kind == 'release' for e in entries)} released, {len(late)} late settlements; "
          f"runs {dict(Counter(r.status for r in runs))}, {sum(r.status == 'failed' for r in spent)} failed after measuring")
    assert not [r for r in runs if r.status == "running"]
    assert BATCHES < 20 or len(reserves) >= 3, "too few retrains to say anything about the ledger"
    # Every measured spend is charged, whatever became of its run; nothing else is.
    measured = sum(r.energy_kwh for r in spent)
    settled = sum(e.energy_kwh for e in entries if e.kind == "settle")
    assert settled == pytest.approx(measured, rel=1e-9, abs=1e-15)
    assert audit_totals["settled_kwh"] == pytest.approx(measured, rel=1e-9, abs=1e-15)
    assert open_left == 0
