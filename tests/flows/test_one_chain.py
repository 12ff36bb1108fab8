"""The library poll (``watch_once``) and the Prefect ``watch`` flow run one chain: on the same
landing content they leave every batch in the same state, also when one batch's assessment
fails for a reason that is not the batch's own (it is given back, the others go on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flow_support import PipelineEnv, hand_made_calibration, sqlite_only

from shiftcost import pipeline
from shiftcost.store import models as db

pytestmark = [pytest.mark.usefixtures("prefect_server"), sqlite_only]

FAULT = "CUDA error: an illegal memory access was encountered"


def land(folder: Path, env: PipelineEnv) -> None:
    """A batch whose forward pass crashes the device (its first image is flat), then a clean one."""
    from shiftcost.data import Batch, save_batch

    folder.mkdir(exist_ok=True)
    x, y = env.stream(0, 150)
    x = x.clone()
    x[0] = 0.5
    save_batch(Batch(x, y, "a-broken"), folder / "a-broken.npz")
    save_batch(Batch(*env.stream(150, 350), "b-clean"), folder / "b-clean.npz")


def crash_on_a_flat_image(module: torch.nn.Module, args: tuple) -> None:
    """Forward passes over a batch holding a flat image fail as a device fault would (not an InputError)."""
    if type(module).__name__ == "DigitsCNN" and not module.training:
        images = args[0].flatten(1)
        if bool((images == images[:, :1]).all(dim=1).any()):
            raise RuntimeError(FAULT)


def statuses(env: PipelineEnv, model_name: str) -> dict[str, str]:
    return {Path(batch.source_uri).name: batch.status for batch in env.rows(db.Batch, db.Batch.model_name == model_name)}


def test_the_library_poll_and_the_watch_flow_leave_the_same_statuses_when_one_assessment_crashes(pipeline_env: PipelineEnv) -> None:
    from flows.watch import watch

    env = pipeline_env
    # The flow works on a second registration of the same model, with its own landing folder.
    flow_landing = env.root / "landing-flow"
    overrides = {"model_name": "digits-flow", "landing": str(flow_landing)}
    x_ref, y_ref = env.trained.splits["holdout"]
    pipeline.bootstrap(
        env.settings.model_copy(update=overrides), env.trained.model, env.trained.spec, x_ref, y_ref,
        calibration=pipeline.fit_cost_model(hand_made_calibration(), level=0.8, features=["resque_dist"]), joules_per_sample_epoch=0.5, hardware="test machine",
    )  # fmt: skip
    land(env.landing, env)
    land(flow_landing, env)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(crash_on_a_flat_image)
    try:
        library = pipeline.watch_once(env.settings)
        flow = watch(overrides)
    finally:
        handle.remove()

    expected = {"a-broken.npz": "registered", "b-clean.npz": "done"}
    assert statuses(env, env.settings.model_name) == expected
    assert statuses(env, "digits-flow") == expected
    # Both report the crash of the first batch and went on with the second.
    broken, clean = library
    assert FAULT in (broken.error or "") and broken.assessment is not None and broken.assessment.status == "registered"
    assert clean.error is None and clean.assessment.status == "done" and clean.assessment.action == "skip"
    failed, done = flow
    assert failed["flow_state"] == "FAILED" and FAULT in failed["message"]
    assert done["status"] == "done" and done["action"] == "skip"
    # The crashed batch was given back, not failed: the next poll takes it again.
    with pipeline.connect(env.settings) as database:
        waiting = pipeline.pending_batches(database, env.settings.model_name, env.settings.claim_lease_s)
    assert [p.batch_id for p in waiting] == [broken.assessment.batch_id]
