"""A retrain whose process is killed outright (SIGKILL, the OOM killer) cannot record itself:
the watch closes it once its lease is over and settles the work its last heartbeat carried.

Runs on SQLite and PostgreSQL (``pipeline_env`` is built on the ``database_url`` fixture).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_support import PipelineEnv

from shiftcost import pipeline
from shiftcost.store import models as db

HEARTBEAT_S = 0.3


@pytest.mark.slow
def test_a_retrain_killed_outright_is_settled_at_the_priced_work_its_last_heartbeat_carried(pipeline_env: PipelineEnv, tmp_path: Path) -> None:
    env = pipeline_env
    env.budget("monthly", period="monthly", kwh=1.0)
    batch = env.drop_unlearnable("unlearnable.npz")
    environment = os.environ | {"SHIFTCOST_RETRAIN_HEARTBEAT_S": str(HEARTBEAT_S), "SHIFTCOST_RETRAIN_MAX_EPOCHS": "100000"}
    with open(tmp_path / "assess.log", "wb") as log:
        assess = subprocess.Popen(
            [sys.executable, "-c", "from shiftcost.cli import main; main()", "assess", str(batch)],
            env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while assess.poll() is None and time.monotonic() < deadline and not _reported_steps(env):
            time.sleep(0.1)
        assert _reported_steps(env), (tmp_path / "assess.log").read_text()[-4000:]
        time.sleep(3 * HEARTBEAT_S)  # a few more beats: the last one is the one the ledger must get
    finally:
        os.killpg(assess.pid, signal.SIGKILL)
        assess.wait()
    (run,) = env.rows(db.RetrainRun)
    assert run.status == "running"  # nothing in the process could record its end
    last = run.progress

    with pipeline.connect(env.settings) as database:
        assert pipeline.fail_stale_retrains(database, env.settings.model_name, older_than_s=60) == []  # its lease is not over
        time.sleep(1.5)
        (closed,) = pipeline.fail_stale_retrains(database, env.settings.model_name, older_than_s=1)

    (run,) = env.rows(db.RetrainRun)
    assert (run.status, run.steps, run.energy_method) == ("failed", last["steps"], "priced")  # not measured
    assert f"after {last['steps']} steps" in run.error and closed.settled and not closed.released
    entries = env.rows(db.LedgerEntry, db.LedgerEntry.decision_id == run.decision_id)
    assert [entry.kind for entry in entries] == ["reserve", "settle"]
    settled = entries[1].energy_kwh
    assert settled > 0 and settled == pytest.approx(last["spent_kwh"]) == pytest.approx(run.energy_kwh)
    assert "priced, not measured" in entries[1].reason
    assert env.remaining_kwh("monthly") == pytest.approx(1.0 - settled)
    assert [batch.status for batch in env.rows(db.Batch)] == ["failed"]


def _reported_steps(env: PipelineEnv) -> int:
    runs = env.rows(db.RetrainRun)
    progress = runs[0].progress if runs else None
    return 0 if not progress else int(progress["steps"])
