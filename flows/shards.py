"""The forward pass of a batch too large for one worker: shards on a Dask cluster, merged."""

from __future__ import annotations

import time

from shiftcost import pipeline
from shiftcost.config import Settings
from shiftcost.index.engine import IndexReport
from shiftcost.index.shards import split_batch
from tasks import assess as steps
from tasks import shards as shard_steps


def dask_task_runner(settings: Settings):  # -> prefect_dask.DaskTaskRunner
    """The cluster at ``dask_address``, or a temporary local one of ``dask_local_workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={
            "n_workers": settings.dask_local_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        }
    )  # fmt: skip


def forward_pass(settings: Settings, loaded: pipeline.LoadedBatch) -> IndexReport:
    """One forward pass, or shards of ``index_shard_size`` images on Dask when the batch is larger."""
    x = loaded.data.x
    if not settings.index_shard_size or len(x) <= settings.index_shard_size:
        return steps.forward_pass(settings, loaded)
    started = time.perf_counter()
    shards = split_batch(x, loaded.data.y, shard_size=settings.index_shard_size)
    with dask_task_runner(settings) as runner:
        futures = [
            runner.submit(
                shard_steps.shard_states,
                {"model": loaded.model, "spec": loaded.spec, "reference": loaded.reference, "shard": shard,
                 "task": loaded.new_task, "device": settings.device},
            )  # fmt: skip
            for shard in shards
        ]
        states = [future.result() for future in futures]
    return shard_steps.merge_shards(
        loaded.spec, loaded.reference, states, task=loaded.new_task, device=settings.device, seconds=time.perf_counter() - started
    )
