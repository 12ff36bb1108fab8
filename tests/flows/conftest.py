"""Fixtures for the pipeline and flow tests: one Prefect test server, one small trained model.

The model is the digits CNN on 8x8 digits, trained once per session for a few epochs (about
98% on the holdout split, its reference data). The initial cost model is fitted on a small
hand-made calibration in which epochs grow linearly with RESQUE_dist: the flows under test
need *a* fitted cost model; how well it predicts is for the cost model's own tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flow_support import IMAGE_SIZE, PipelineEnv, TrainedModel, environment_settings, hand_made_calibration

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The flows log to the console; shipping every line to the test server as well only costs time.
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# The test server's event services write to the same SQLite file as the flow-run API. Under
# load a flow's state update then waited on their transactions for SQLite's whole 60-second
# busy timeout, and came back without its result. No test reads task runs, events or
# automations, so they are off; the flows' fallback for a lost result has its own test.
for service in ("TASK_RUN_RECORDER", "EVENT_PERSISTER", "TRIGGERS"):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Prefect's test harness (a temporary API on SQLite), started once and shared.

    Flow run heartbeats (crash detection for long runs) are off: their thread sleeps in
    one-second steps, so every flow run would wait up to a second for it to stop.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture(scope="session")
def trained_model() -> TrainedModel:
    from shiftcost.data import build_model
    from shiftcost.data.demo import load_digits, split_digits, train_classifier

    x, y = load_digits(image_size=IMAGE_SIZE)
    splits = split_digits(x, y, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, spec = build_model("digits_cnn", 10, in_channels=1, image_size=IMAGE_SIZE)
    train_classifier(model, *splits["train"], epochs=6, seed=0)
    return TrainedModel(model, spec, splits)


@pytest.fixture
def pipeline_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained_model: TrainedModel) -> PipelineEnv:
    """Settings in the environment, the model bootstrapped, an empty landing folder."""
    from shiftcost import pipeline

    settings = environment_settings(database_url, tmp_path, monkeypatch)
    landing = tmp_path / "landing"
    x_ref, y_ref = trained_model.splits["holdout"]
    cost_model = pipeline.fit_cost_model(hand_made_calibration(), level=0.8, features=["resque_dist"])
    bootstrapped = pipeline.bootstrap(
        settings, trained_model.model, trained_model.spec, x_ref, y_ref,
        calibration=cost_model, joules_per_sample_epoch=0.5, hardware="test machine",
    )  # fmt: skip
    return PipelineEnv(settings, tmp_path, landing, trained_model, bootstrapped)
