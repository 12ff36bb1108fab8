"""A batch without labels waits for them, and is retrained once they come (SQLite and PostgreSQL).

Each poll is the real ``watch`` flow on Prefect's test server, as in test_flows.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from shiftcost.cli import app
from shiftcost.errors import InputError
from shiftcost.store import models as db
from tests.flows.flow_support import PipelineEnv, brightened

pytestmark = pytest.mark.usefixtures("prefect_server")


def run_watch() -> list[dict]:
    from flows.watch import watch

    return watch()


def _attach(batch: str, path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["labels", "attach", batch, str(path), "--json"])
    if isinstance(result.exception, InputError):
        return 2, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout


def test_an_unlabelled_batch_awaits_its_labels_then_is_retrained(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    x, y = env.stream(0, 200)
    path = env.drop("night.npz", brightened(x), None)

    (result,) = run_watch()
    assert result["action"] == "defer"
    (batch,) = env.rows(db.Batch)
    assert batch.status == "awaiting_labels" and not batch.has_labels
    (decision,) = env.rows(db.Decision)
    assert decision.action == "defer" and decision.cost_prediction_id is not None
    assert "awaiting_labels" in [reason["code"] for reason in decision.reasons]
    (prediction,) = env.rows(db.CostPrediction)
    assert prediction.details["stage"] == "index" and prediction.details["probe_advice"] == "the batch has no labels, and a probe trains on them"
    assert env.count(db.RetrainRun) == 0 and env.count(db.LedgerEntry) == 0
    # The label-free features of the pass are kept with the index run: no accuracy or loss, but entropy and confidence.
    (index_run,) = env.rows(db.IndexRun)
    assert index_run.accuracy is None and index_run.mean_loss is None and index_run.resque_dist_variant == "predicted"
    assert index_run.mean_entropy > 0 and 0.1 <= index_run.mean_confidence <= 1.0
    assert index_run.mean_confidence == index_run.details["mean_confidence"]

    # Labels that do not fit: refused, nothing written.
    short = env.root / "short.labels.npz"
    np.savez(short, y=y[:-1].numpy())
    code, message = _attach(str(batch.id), short)
    assert code == 2 and "199 labels but batch" in message
    foreign = env.root / "foreign.labels.npz"
    np.savez(foreign, y=y.numpy(), fingerprint="0" * 64)
    code, message = _attach(str(path), foreign)
    assert code == 2 and "belongs to the batch with fingerprint" in message
    assert env.rows(db.Batch)[0].labels_uri is None and env.rows(db.Batch)[0].status == "awaiting_labels"

    # The landing convention: NAME.labels.npz beside NAME.npz; the next poll decides afresh.
    np.savez(env.landing / "night.labels.npz", y=y.numpy(), fingerprint=batch.fingerprint)
    (result,) = run_watch()
    assert result["action"] == "retrain", result
    (batch,) = env.rows(db.Batch)
    assert batch.labels_uri.endswith("night.labels.npz") and batch.has_labels
    assert env.count(db.Batch) == 1  # the labels file is not a batch
    decisions = env.rows(db.Decision)
    assert [d.action for d in decisions] == ["defer", "retrain"]
    (run,) = env.rows(db.RetrainRun)
    assert run.error is None, run.error
    assert run.batch_id == batch.id and run.status in ("succeeded", "cap_reached") and batch.status == "done"

    # Labels for a batch already retrained on: refused.
    code, message = _attach(str(batch.id), env.landing / "night.labels.npz")
    assert code == 2 and "retrained on already" in message


def test_labels_attach_by_command_gives_the_batch_back(pipeline_env: PipelineEnv) -> None:
    env = pipeline_env
    x, y = env.stream(0, 200)
    env.drop("dusk.npz", brightened(x), None)
    run_watch()
    (batch,) = env.rows(db.Batch)
    assert batch.status == "awaiting_labels"
    labels = env.root / "dusk-labels.npz"
    np.savez(labels, y=y.numpy())
    code, out = _attach(str(batch.id), labels)
    assert code == 0 and json.loads(out)["status"] == "registered"
    (batch,) = env.rows(db.Batch)
    assert batch.status == "registered" and batch.labels_uri == str(labels.resolve())
    # The next poll decides afresh with the labels, and retrains.
    (result,) = run_watch()
    assert result["action"] == "retrain", result
    (run,) = env.rows(db.RetrainRun)
    assert run.error is None and run.batch_id == batch.id and run.status in ("succeeded", "cap_reached")
    assert [d.action for d in env.rows(db.Decision)] == ["defer", "retrain"]
    (batch,) = env.rows(db.Batch)
    assert batch.status == "done" and batch.has_labels
