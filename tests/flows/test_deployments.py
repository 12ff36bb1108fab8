"""Production hand-offs: deployments started with run_deployment, once per batch, and prefect.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from flow_support import PipelineEnv, brightened, sqlite_only

from flows.deployments import DEPLOYMENTS

ROOT = Path(__file__).resolve().parents[2]


@sqlite_only
@pytest.mark.usefixtures("prefect_server")
# start_deployment is called once more outside any flow run, where its log lines cannot reach the API.
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_deployment_mode_starts_each_batch_s_runs_once_keyed_by_its_fingerprint(
    pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from flows.assess import assess
    from flows.deployments import served_deployments
    from flows.handoff import start_deployment
    from flows.watch import watch
    from shiftcost import pipeline
    from shiftcost.config import load_settings

    env = pipeline_env
    monkeypatch.setenv("SHIFTCOST_FLOW_MODE", "deployment")
    settings = load_settings()
    for deployment in served_deployments(settings, scheduled=False):
        deployment.apply()  # registered with the API; no worker runs them here
    env.budget("monthly", period="monthly", kwh=1.0)
    x, y = env.stream(0, 200)
    env.drop("bright.npz", brightened(x), y)

    # watch hands the batch to the assess deployment; a second poll finds the same run.
    (first,) = watch()
    (second,) = watch()
    assert first["assess_flow_run"] == second["assess_flow_run"]

    # assess (run here in-process) hands the retrain decision to the retrain deployment.
    result = assess(first["batch_id"])
    assert result["action"] == "retrain" and "retrain_flow_run" in result
    with pipeline.connect(settings) as db:
        registration = pipeline.register_batch(db, settings, str(env.landing / "bright.npz"))
    key = f"digits:{registration.fingerprint}"
    again = start_deployment(settings.retrain_deployment, {"batch_id": first["batch_id"], "overrides": None}, key)
    assert again == result["retrain_flow_run"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(result["retrain_flow_run"])
        assess_run = client.read_flow_run(first["assess_flow_run"])
    assert run.idempotency_key == key and run.parameters["batch_id"] == first["batch_id"]
    assert run.state is not None and run.state.is_scheduled()
    assert assess_run.idempotency_key.startswith(key + ":")


def test_prefect_yaml_declares_the_deployments_the_code_serves() -> None:
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert [d["name"] for d in declared] == [spec.name for spec in DEPLOYMENTS]
    for entry, spec in zip(declared, DEPLOYMENTS):
        assert entry["entrypoint"] == spec.entrypoint and (ROOT / spec.entrypoint.split(":")[0]).is_file()
        assert entry["work_pool"]["name"] == spec.work_pool
        assert bool(entry.get("schedules")) == spec.scheduled
    names = {spec.full_name for spec in DEPLOYMENTS}
    from shiftcost.config import Settings

    defaults = Settings.model_fields
    assert {defaults["assess_deployment"].default, defaults["retrain_deployment"].default} <= names


def test_the_entrypoints_are_the_flows_with_the_declared_names() -> None:
    import importlib

    for spec in DEPLOYMENTS:
        flow = getattr(importlib.import_module(spec.module), spec.function)
        assert flow.name == spec.flow_name
