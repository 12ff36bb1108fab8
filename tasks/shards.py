"""Tasks of a sharded forward pass: one per shard, run wherever the task runner sends them.

A shard's task returns its accumulator states; the merge takes each shard's returned
states once, so a shard retried after a fault (an exception, or a Dask worker that died
and whose work Dask ran again elsewhere) is never counted twice. No ``gpu`` tag: shards
are meant to run side by side, on the Dask workers' own devices.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shiftcost.index.engine import IndexReport
from shiftcost.index.reference import ReferenceStats
from shiftcost.index.shards import Shard, index_shard, report_from_shards
from shiftcost.index.state import StateDict


@task(name="index-shard", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=1)
def shard_states(model: Any, spec: Any, reference: ReferenceStats, shard: Shard, *, task: bool, device: str) -> StateDict:
    """The accumulator states of one shard's forward pass."""
    return index_shard(model, spec, reference, shard, task=task, device=device)


@task(name="merge-shards", cache_policy=NO_CACHE, persist_result=False)
def merge_shards(spec: Any, reference: ReferenceStats, states: list[StateDict], *, task: bool, device: str, seconds: float) -> IndexReport:
    """Every index of the batch from its shards' states."""
    report = report_from_shards(spec, reference, states, task=task, device=device, seconds=seconds)
    get_run_logger().info("%d shards merged: %d images", len(states), report.samples)
    return report
