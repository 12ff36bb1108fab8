"""The sharded forward pass on a real Dask cluster (two worker processes) through prefect-dask.

The shards' merged indices must equal a single pass to 1e-12, also when a shard's first
attempt fails (the task is retried) or its worker process dies mid-shard (Dask runs it
again on a live worker): the merge takes each shard's returned state once.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("prefect_dask")
distributed = pytest.importorskip("distributed")

from prefect import flow  # noqa: E402

from flow_support import sqlite_only  # noqa: E402

from flows.shards import forward_pass  # noqa: E402
from shiftcost.config import Settings  # noqa: E402
from shiftcost.index.engine import assess, compute_reference_stats  # noqa: E402
from shiftcost.index.reference import ReferenceStats  # noqa: E402

pytestmark = pytest.mark.slow  # a Dask cluster of two worker processes and a Prefect server

TOL = 1e-12
SHARD_SIZE = 40


def fail_first_attempt(marker: Path, how: str, module: torch.nn.Module, inputs: tuple) -> None:
    """A forward pre-hook: the first forward call anywhere fails (once, across processes)."""
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    if how == "die":
        os._exit(17)  # the worker process dies in the middle of its shard
    raise RuntimeError("injected fault in a shard's first attempt")


def record_process(folder: Path, module: torch.nn.Module, inputs: tuple) -> None:
    """A forward pre-hook: note which process ran a forward call."""
    (folder / str(os.getpid())).touch()


def computed_on(cluster) -> int:
    """Tasks the cluster's scheduler has seen finish so far."""
    return sum(prefix.state_counts["memory"] for prefix in cluster.scheduler.task_prefixes.values())


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


@pytest.fixture(scope="module")
def world(trained_model) -> dict:
    model, spec = copy.deepcopy(trained_model.model).double().eval(), trained_model.spec
    x_ref, y_ref = trained_model.splits["holdout"]
    reference = compute_reference_stats(model, spec, x_ref.double(), y_ref, device="cpu", max_samples=60, seed=1)
    x, y = trained_model.splits["train"]
    x, y = (x[:150].double() + 0.1).clamp(0, 1), y[:150]
    return {"model": model, "spec": spec, "reference": reference, "x": x, "y": y}


@flow(name="sharded-pass-under-test", persist_result=False, validate_parameters=False)
def pass_through_flow(settings: Settings, loaded: SimpleNamespace):
    return forward_pass(settings, loaded)


def run_sharded(world: dict, settings: Settings, model: torch.nn.Module):
    loaded = SimpleNamespace(
        model=model, spec=world["spec"], reference=world["reference"], new_task=False,
        data=SimpleNamespace(x=world["x"], y=world["y"]), batch_id=1,
    )  # fmt: skip
    return pass_through_flow(settings, loaded)


def assert_equal_to_single_pass(report, world: dict) -> None:
    single = assess(world["model"], world["spec"], world["reference"], world["x"], world["y"], device="cpu")
    got, want = report.to_dict(), single.to_dict()
    assert got["samples"] == 150 and got["predicted_counts"] == want["predicted_counts"]
    for key in ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_loss", "mean_entropy"):
        assert math.isclose(got[key], want[key], rel_tol=0, abs_tol=TOL), key
    assert torch.equal(report.embedding_sample[2], single.embedding_sample[2])


@pytest.mark.parametrize("fault", [None, "raise", "die"])
def test_sharded_pass_on_dask_equals_one_pass(prefect_server, cluster, world: dict, tmp_path: Path, fault: str | None) -> None:
    model = copy.deepcopy(world["model"])
    processes = tmp_path / "processes"
    processes.mkdir()
    model.register_forward_pre_hook(functools.partial(record_process, processes))
    if fault is not None:
        model.register_forward_pre_hook(functools.partial(fail_first_attempt, tmp_path / "attempted", fault))
    settings = Settings(device="cpu", index_shard_size=SHARD_SIZE, dask_address=cluster.scheduler_address)
    report = run_sharded(world, settings, model)
    assert_equal_to_single_pass(report, world)
    if fault is not None:
        assert (tmp_path / "attempted").exists()  # the fault did happen
    workers = {int(path.name) for path in processes.iterdir()}
    assert str(os.getpid()) not in {path.name for path in processes.iterdir()}  # no shard ran in this process
    assert len(workers) >= 2  # the shards were spread over the cluster's worker processes


@sqlite_only
def test_the_assess_flow_shards_a_batch_larger_than_the_shard_size(
    prefect_server, cluster, pipeline_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.watch import watch
    from shiftcost.config import load_settings
    from shiftcost.store import models as db

    env = pipeline_env
    # Shards of whole chunks (256 images, the pass's batch size): the float32 model then sees
    # exactly the chunks of a single pass, so its activations are the same to the bit.
    monkeypatch.setenv("SHIFTCOST_INDEX_SHARD_SIZE", "256")
    monkeypatch.setenv("SHIFTCOST_DASK_ADDRESS", cluster.scheduler_address)
    assert load_settings().index_shard_size == 256
    x, y = env.stream(0, 600)
    env.drop("large.npz", x, y)
    computed_before = computed_on(cluster)

    watch()

    assert computed_on(cluster) - computed_before == 3  # one Dask task per shard

    (run,) = env.rows(db.IndexRun)
    assert run.samples == len(x) > 512  # three shards
    reference = ReferenceStats.load(env.bootstrapped.model.reference_uri)
    single = assess(env.trained.model, env.trained.spec, reference, x, y, device="cpu")
    for key in ("resque_dist", "inv_ari", "layer_shift", "accuracy", "mean_loss", "mean_entropy"):
        assert math.isclose(getattr(run, key), getattr(single, key), rel_tol=0, abs_tol=TOL), key
