"""One deployment set serves many models: the model is a parameter of the runs, not of the
deployments. Twenty models, each with its own landing prefix, go through the same watch,
assess and retrain deployments on Prefect's test server.

No worker runs here: each run the deployments receive is executed in this process with the
parameters the server stored for it, which is what a worker does with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from flow_support import PipelineEnv, brightened, hand_made_calibration, sqlite_only

from shiftcost import pipeline
from shiftcost.store import models as db

MODELS = [f"model-{i:02d}" for i in range(20)]
SHIFTED = MODELS[7]


def runs_of(deployment_name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


@sqlite_only
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_one_deployment_set_serves_twenty_models_named_by_a_parameter(pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.assess import assess
    from flows.deployments import served_deployments
    from flows.retrain import retrain
    from flows.watch import watch
    from shiftcost.config import load_settings

    env = pipeline_env
    monkeypatch.setenv("SHIFTCOST_FLOW_MODE", "deployment")
    settings = load_settings()
    for deployment in served_deployments(settings, scheduled=False):
        deployment.apply()
    env.budget("monthly", period="monthly", kwh=1.0)
    cost_model = pipeline.fit_cost_model(hand_made_calibration(), level=0.8, features=["resque_dist"])
    x_ref, y_ref = env.trained.splits["holdout"]
    x, y = env.stream(0, 200)
    overrides: dict[str, dict[str, str]] = {}
    with pipeline.connect(settings) as database:
        for name in MODELS:
            pipeline.bootstrap(
                settings, env.trained.model, env.trained.spec, x_ref, y_ref, calibration=cost_model,
                joules_per_sample_epoch=0.5, hardware="test machine", name=name, db=database,
            )  # fmt: skip
            landing = env.root / "landing-by-model" / name
            landing.mkdir(parents=True)
            env.landing = landing  # drop() writes into the landing folder of this model
            env.drop(f"{name}.npz", brightened(x) if name == SHIFTED else x, y)
            overrides[name] = {"model_name": name, "landing": str(landing)}

    for name in MODELS:
        (handed,) = watch(overrides[name])
        assert "assess_flow_run" in handed

    # One assess deployment received one run per model, each naming its model.
    assess_runs = runs_of(settings.assess_deployment)
    assert sorted(run.parameters["overrides"]["model_name"] for run in assess_runs) == MODELS
    for run in assess_runs:
        assess(**run.parameters)
    (retrain_run,) = runs_of(settings.retrain_deployment)
    assert retrain_run.parameters["overrides"] == overrides[SHIFTED]
    retrain(**retrain_run.parameters)

    batches = {batch.model_name: batch for batch in env.rows(db.Batch)}
    assert sorted(batches) == MODELS and {batch.status for batch in batches.values()} == {"done"}
    assert {run.parameters["batch_id"] for run in assess_runs} == {batch.id for batch in batches.values()}
    actions = {decision.batch_id: decision.action for decision in env.rows(db.Decision)}
    assert actions == {batch.id: ("retrain" if name == SHIFTED else "skip") for name, batch in batches.items()}
    (retrained,) = env.rows(db.RetrainRun)
    assert (retrained.batch_id, retrained.status) == (batches[SHIFTED].id, "succeeded")
    versions = {(model.name, model.version) for model in env.rows(db.Model) if model.name in MODELS}
    assert versions == {(name, 1) for name in MODELS} | {(SHIFTED, 2)}
